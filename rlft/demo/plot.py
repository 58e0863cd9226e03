"""A dependency-free SVG line plot of held-out reward against wall-clock time for a run."""

from __future__ import annotations

from html import escape


def reward_vs_time_svg(store, run_id: str, key: str = "reward/mean", width: int = 560, height: int = 320) -> str:
    run = store.get_run(run_id)
    t0 = run.get("started_at") or run.get("created_at") or 0
    pts = sorted(((e["created_at"] - t0) / 60, e["metrics"].get(key) or 0.0)
                 for e in store.evals(run_id) if e.get("step") is not None)
    return line_svg(pts, title=f"held-out {key} — run {run_id}", xlabel="minutes", ylabel=key, width=width,
                    height=height)


def line_svg(pts: list[tuple[float, float]], *, title: str, xlabel: str, ylabel: str, width: int = 560,
             height: int = 320, ymin: float = 0.0, ymax: float = 1.0) -> str:
    left, right, top, bottom = 56, 16, 32, 44
    xmax = max([p[0] for p in pts] + [1e-9])
    ymax = max([ymax] + [p[1] for p in pts])

    def sx(x: float) -> float:
        return left + (width - left - right) * x / xmax

    def sy(y: float) -> float:
        return height - bottom - (height - top - bottom) * (y - ymin) / (ymax - ymin)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for i in range(6):
        y = ymin + (ymax - ymin) * i / 5
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.1f}</text>')
    for i in range(6):
        x = xmax * i / 5
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:.1f}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>')
    mid = (top + height - bottom) / 2
    out.append(f'<text x="14" y="{mid}" transform="rotate(-90 14 {mid})" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    if pts:
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))
        out.append(f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#1f77b4">'
                       f'<title>{x:.2f} min: {y:.3f}</title></circle>')
    out.append("</svg>")
    return "\n".join(out)
