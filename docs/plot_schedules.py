"""Draw the four noise schedules into docs/noise_schedules.png (the figure of the seed's README).

Left panel: beta_t against t; right panel: alphas_cumprod (abar_t, the signal kept at step t)
against t; T = 500 and the default betas (1e-4 .. 0.02; cosine ignores them). The linear
schedule destroys the signal early, the cosine one (Nichol & Dhariwal 2021) more slowly.

    python docs/plot_schedules.py [--out docs/noise_schedules.png]

Uses mdx.runtime.schedules only (numpy), plus matplotlib for the drawing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mdx.runtime.schedules import SCHEDULES, make_schedule

HERE = Path(__file__).resolve().parent
T = 500


def plot(out: Path, num_train_timesteps: int = T) -> Path:
    """Write the two-panel figure to `out` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_beta, ax_abar) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind in SCHEDULES:
        s = make_schedule(kind, num_train_timesteps)
        ax_beta.plot(s.betas, label=kind, lw=1.6)
        ax_abar.plot(s.alphas_cumprod, label=kind, lw=1.6)
    ax_beta.set(title=r"$\beta_t$", xlabel="timestep t", ylabel=r"$\beta_t$")
    # The cosine betas reach their 0.999 cap at the very end; a log axis keeps every curve readable.
    ax_beta.set_yscale("log")
    ax_abar.set(title=r"$\bar\alpha_t = \prod_{s \leq t} (1 - \beta_s)$", xlabel="timestep t",
                ylabel=r"$\bar\alpha_t$", ylim=(-0.02, 1.02))
    for ax in (ax_beta, ax_abar):
        ax.set_xlim(0, num_train_timesteps - 1)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    fig.suptitle(f"Noise schedules, T = {num_train_timesteps}, betas 1e-4 .. 0.02 (cosine: s = 0.008)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "noise_schedules.png")
    print(plot(parser.parse_args().out))


if __name__ == "__main__":
    main()
