"""A small derivative-free minimiser (Nelder-Mead) in pure Python, for the calibration.

The calibration fits about ten positive constants; its objective is cheap (cached loads) but
piecewise (a max of terms), so a simplex search on the logarithms of the parameters is the
robust choice. No numpy: the library must not need it.
"""

from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["nelder_mead"]


def nelder_mead(f: Callable[[list], float], x0: Sequence[float], step: float = 0.3,
                max_evals: int = 4000, tol: float = 1e-9) -> tuple[list, float]:
    """Minimise ``f`` from ``x0``; returns ``(x, f(x))``.

    Standard coefficients (reflection 1, expansion 2, contraction 1/2, shrink 1/2); the initial
    simplex steps each coordinate by ``step``. Stops after ``max_evals`` evaluations or when the
    simplex's values agree within ``tol``. Example: ``nelder_mead(lambda x: (x[0] - 3) ** 2,
    [0.0])`` returns ``x`` close to ``[3.0]``.
    """
    n = len(x0)
    pts = [list(x0)] + [[x0[j] + (step if j == i else 0.0) for j in range(n)] for i in range(n)]
    vals = [f(p) for p in pts]
    evals = len(pts)
    while evals < max_evals:
        order = sorted(range(n + 1), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] <= tol * (1 + abs(vals[0])):
            break
        centroid = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        worst = pts[-1]

        def toward(c: float, centroid: list = centroid, worst: list = worst) -> list:
            return [centroid[j] + c * (worst[j] - centroid[j]) for j in range(n)]

        refl = toward(-1.0)
        fr = f(refl)
        evals += 1
        if fr < vals[0]:
            exp = toward(-2.0)
            fe = f(exp)
            evals += 1
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = toward(0.5 if fr >= vals[-1] else -0.5)
            fc = f(con)
            evals += 1
            if fc < min(fr, vals[-1]):
                pts[-1], vals[-1] = con, fc
            else:  # shrink toward the best point
                for i in range(1, n + 1):
                    pts[i] = [pts[0][j] + 0.5 * (pts[i][j] - pts[0][j]) for j in range(n)]
                    vals[i] = f(pts[i])
                evals += n
    best = min(range(n + 1), key=vals.__getitem__)
    return pts[best], vals[best]
