"""The report that :func:`fnn.check_grads` returns, and the error it raises."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class GradCheckEntry:
    """The worst comparison for one argument path, one mode and one derivative.

    Attributes:
      of: the function whose derivative was checked: ``"f"`` at first order;
        ``"vjp(f)"`` (a gradient of ``f``) or ``"jvp(f)"`` (a directional
        derivative of ``f``) at second order, and so on.
      order: ``1`` for first derivatives, ``2`` for second derivatives.
      mode: ``"fwd"`` (JVP against finite differences) or ``"rev"`` (VJP with a
        random cotangent against finite differences).
      path: the input leaf, as ``jax.tree_util.keystr`` writes it after the
        argument name, e.g. ``"args[0]['w']"``.
      index: the worst input element (a tuple of ints), or ``None`` when the
        worst comparison was along a direction that spans many elements.
      direction: how the input was perturbed for the worst comparison:
        ``"element"``, ``"block of N elements"`` or ``"random direction"``.
      output: the output element compared (forward mode), or ``None``.
      analytic: the derivative autodiff gave.
      numeric: the finite-difference estimate (Richardson extrapolated).
      abs_err: ``|analytic - numeric|``.
      rel_err: ``abs_err / |numeric|``.
      tol: the tolerance ``abs_err`` had to meet:
        ``atol + rtol * max(|analytic|, |numeric|) + 4 * fd_err``.
      fd_err: the estimated error of ``numeric`` itself.
      checked: how many comparisons were made for this path and mode.
      failed: how many of them exceeded their tolerance.
      problem: ``None`` when every comparison passed; else what the worst
        failure is: ``"mismatch"`` (autodiff and finite differences disagree),
        ``"jump"`` (the function is discontinuous there: its change over a
        step stays the same as the step shrinks), ``"kink"`` (its one-sided
        derivatives differ there) or ``"not finite"`` (a derivative is
        infinite or NaN).
      jump: for a ``"jump"``, the change of the compared output (or of its
        projection on a cotangent) across the smallest step; else ``None``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fnn
      >>> report = fnn.check_grads(jnp.sin, (jnp.zeros(2),), modes="rev")
      >>> entry = report.entries[0]
      >>> entry.path, entry.mode, entry.passed, entry.problem
      ('args[0]', 'rev', True, None)
    """

    of: str
    order: int
    mode: str
    path: str
    index: tuple[int, ...] | None
    direction: str
    output: str | None
    analytic: float
    numeric: float
    abs_err: float
    rel_err: float
    tol: float
    fd_err: float
    checked: int
    failed: int
    problem: str | None = None
    jump: float | None = None

    @property
    def passed(self) -> bool:
        """Whether every comparison for this path and mode met its tolerance."""
        return self.failed == 0

    @property
    def ratio(self) -> float:
        """``abs_err / tol`` of the worst comparison; above 1 means a failure.

        Infinite at a jump and where a derivative is not finite.
        """
        if self.problem in ("jump", "not finite"):
            return math.inf
        if self.tol > 0:
            return self.abs_err / self.tol
        return 0.0 if self.abs_err == 0 else math.inf

    def where(self) -> str:
        """The worst element, written for people, e.g. ``args[0]['w'][2, 1]``."""
        if self.index is not None:
            return f"{self.path}[{', '.join(map(str, self.index))}]"
        return f"{self.path} ({self.direction})"


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """What :func:`fnn.check_grads` found: one entry per derivative, mode and path.

    Attributes:
      entries: the :class:`GradCheckEntry` of every checked combination.
      notes: things worth knowing about the check (modes skipped, leaves skipped,
        low-precision operations inside ``f``).

    Examples:
      >>> import jax.numpy as jnp
      >>> import fnn
      >>> report = fnn.check_grads(jnp.tanh, (jnp.ones(3),))
      >>> report.passed, len(report.entries), report.failures
      (True, 2, ())
      >>> report.notes
      ('inputs upcast from float32 to float64.',)
    """

    entries: tuple[GradCheckEntry, ...]
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """Whether every entry passed."""
        return all(e.passed for e in self.entries)

    @property
    def failures(self) -> tuple[GradCheckEntry, ...]:
        """The entries that failed, worst first."""
        bad = [e for e in self.entries if not e.passed]
        return tuple(sorted(bad, key=lambda e: -e.ratio))

    @property
    def worst(self) -> GradCheckEntry | None:
        """The entry with the largest ``abs_err / tol``, or ``None`` if empty."""
        if not self.entries:
            return None
        return max(self.entries, key=lambda e: e.ratio)

    def summary(self) -> str:
        """One sentence: what failed worst, with its values, or that all passed."""
        if not self.failures:
            return f"All {len(self.entries)} gradient checks passed."
        return _sentence(self.failures[0])

    def __str__(self) -> str:
        header = (
            "of",
            "mode",
            "worst element",
            "output",
            "analytic",
            "numeric",
            "abs err",
            "rel err",
            "tol",
            "failed",
        )
        rows = [header]
        for e in self.entries:
            rows.append(
                (
                    e.of,
                    e.mode,
                    e.where(),
                    e.output or "-",
                    f"{e.analytic:.9g}",
                    f"{e.numeric:.9g}",
                    f"{e.abs_err:.2e}",
                    f"{e.rel_err:.2e}",
                    f"{e.tol:.2e}",
                    f"{e.failed}/{e.checked}" + _flag(e),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [self.summary()]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _flag(e: GradCheckEntry) -> str:
    if not e.failed:
        return ""
    return "  FAIL" + (f" ({e.problem})" if e.problem not in (None, "mismatch") else "")


def _order(e: GradCheckEntry) -> str:
    return "derivative" if e.order == 1 else f"order-{e.order} derivative"


def _sentence(e: GradCheckEntry) -> str:
    """The one-sentence summary of the failed entry ``e``."""
    out = f", output {e.output}" if e.output else ""
    what = f"{e.mode}-mode {_order(e)} of {e.of}{out}"
    counts = f"{e.failed} of {e.checked} comparisons failed"
    values = f"analytic {e.analytic:.9g} vs numeric {e.numeric:.9g}"
    if e.problem == "jump":
        return (
            f"Gradient check failed: {e.of} jumps at {e.where()} ({what}): its "
            f"change across the step stays {e.jump:.3g} as the step shrinks, so "
            f"the finite difference grows like 1/step ({values}) and {e.of} is "
            f"discontinuous there, with no derivative to check; leave such points "
            f"out with mask= ({counts})."
        )
    if e.problem == "not finite":
        return (
            f"Gradient check failed: the derivative is not finite at {e.where()} "
            f"({what}): {values}; {e.of} may not be differentiable or not defined "
            f"there, so leave such elements out with mask= ({counts})."
        )
    if e.problem == "kink":
        return (
            f"Gradient check failed for {e.where()} ({what}): {values}, at a kink "
            f"of {e.of} (its one-sided derivatives differ there), where it is not "
            f"differentiable; leave such points out with mask= ({counts})."
        )
    return (
        f"Gradient check failed for {e.where()} ({what}): {values}, abs error "
        f"{e.abs_err:.3g}, rel error {e.rel_err:.3g} > tolerance {e.tol:.3g} "
        f"({counts})."
    )


class GradientCheckError(AssertionError):
    """Autodiff and finite differences disagree; ``.report`` says where and how.

    A subclass of ``AssertionError``, so test frameworks show it as a failed
    assertion. ``str(err)`` is the report's one-sentence summary followed by the
    full table.

    Attributes:
      report: the :class:`GradCheckReport` of the failed check.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fnn
      >>> try:
      ...     fnn.check_grads(jnp.abs, (jnp.array([0.0, 1.0]),))
      ... except fnn.GradientCheckError as e:
      ...     print(e.report.failures[0].problem, e.report.failures[0].where())
      kink args[0][0]
    """

    def __init__(self, report: GradCheckReport):
        super().__init__(str(report))
        self.report = report
