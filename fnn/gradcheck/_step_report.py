"""The report that :func:`fnn.check_step` returns, and the error it raises."""

from __future__ import annotations

import dataclasses

from fnn.gradcheck._report import GradientCheckError

CHECKS = ("accumulation", "mask", "steps_per_call", "mesh", "gradient")
DEFAULT_RTOL = 1e-9  # float64 sums in another order differ by about 1e-15
HINTS = {
    "accumulation": "return the loss summed over examples and the weight, not a "
    "mean, so that the step divides once",
    "mask": "multiply each example's loss by the mask before any reduction and "
    "return the mask's sum as the weight",
    "steps_per_call": "steps_per_call=K must equal K single steps, each on its "
    "own batch, carrying params, optimizer state and step",
    "mesh": "the sharded step must add every device's sums and divide once",
    "gradient": "a custom derivative in the loss is wrong, or the loss is not "
    "smooth at these params; fnn.check_grads on the suspect function says which",
}


@dataclasses.dataclass(frozen=True)
class StepCheckEntry:
    """The worst comparison of one check.

    Attributes:
      check: one of :data:`CHECKS`.
      path: the value, e.g. ``"grad['0_dense']['w']"``, ``"metrics['weight']"``.
      index: its worst element, or ``None`` for a scalar.
      got: the step's value there (for ``gradient``, autodiff's).
      want: the reference's value there (for ``gradient``, the numeric one).
      rel_err: ``|got - want|`` over the largest magnitude in the leaf.
      tol: the relative tolerance it was held to.
      passed: whether every comparison of the check passed.
      detail: what was compared with what.
    """

    check: str
    path: str
    index: tuple[int, ...] | None
    got: float
    want: float
    rel_err: float
    tol: float
    passed: bool
    detail: str

    def where(self) -> str:
        """The worst element, e.g. ``grad['w'][2]``."""
        index = f"[{', '.join(map(str, self.index))}]" if self.index else ""
        return self.path + index


@dataclasses.dataclass(frozen=True)
class StepCheckReport:
    """What :func:`check_step` found: an entry per check run, and the skipped.

    Attributes:
      entries: a :class:`StepCheckEntry` per check run.
      skipped: why each skipped check was skipped, e.g. ``"mesh: no mesh"``.

    Examples:
      >>> from fnn.gradcheck import StepCheckReport
      >>> from fnn.gradcheck._step_report import StepCheckEntry
      >>> entry = StepCheckEntry("mask", "metrics['weight']", None, 8.0, 7.0,
      ...                        0.125, 1e-9, False, "with masked rows vs without")
      >>> report = StepCheckReport((entry,), ("mesh: no mesh",))
      >>> report.passed, report.failures[0].where()
      (False, "metrics['weight']")
    """

    entries: tuple[StepCheckEntry, ...]
    skipped: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return all(e.passed for e in self.entries)

    @property
    def failures(self) -> tuple[StepCheckEntry, ...]:
        return tuple(e for e in self.entries if not e.passed)

    def summary(self) -> str:
        """One sentence: the first failure with its values, or that all passed."""
        if self.passed:
            return f"check_step: all {len(self.entries)} checks passed."
        e = self.failures[0]
        return (
            f"check_step: the {e.check} check failed at {e.where()} ({e.detail}): "
            f"got {e.got:.9g}, expected {e.want:.9g} (relative error "
            f"{e.rel_err:.3g} > {e.tol:.3g}); {HINTS[e.check]}."
        )

    def __str__(self) -> str:
        rows = [("check", "worst value", "got", "expected", "rel err", "")]
        rows += [
            (e.check, e.where(), f"{e.got:.9g}", f"{e.want:.9g}", f"{e.rel_err:.2e}")
            + ("ok" if e.passed else "FAIL",)
            for e in self.entries
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = [self.summary()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines += [f"skipped: {s}" for s in self.skipped]
        return "\n".join(line.rstrip() for line in lines)


class StepCheckError(GradientCheckError):
    """A training step differs from its reference; ``.report`` says where.

    A subclass of :class:`fnn.GradientCheckError` (so of ``AssertionError``:
    pytest shows it as a failed assertion). ``str(err)`` is the report: a
    sentence naming the first failed check, then a table of every check.

    Attributes:
      report: the :class:`StepCheckReport`; ``report.failures[0]`` names the
        check, the path and both values.

    Examples:
      >>> import fnn
      >>> issubclass(fnn.gradcheck.StepCheckError, fnn.GradientCheckError)
      True
    """

    def __init__(self, report: StepCheckReport):
        AssertionError.__init__(self, str(report))
        self.report = report


StepCheckError.__module__ = "fnn.gradcheck"
