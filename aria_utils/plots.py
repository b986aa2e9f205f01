"""Pictures of what people look at: the per-region discrepancy over training as a heat map."""

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def finish_figure(figure, path):
    """Lay out, render to an RGB array (for TensorBoard), save as PNG when asked, close."""
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        figure.savefig(path, dpi=100)
    _pyplot().close(figure)
    return image


def region_heatmap(region_history, path=None, max_columns=200, region_names=None):
    """Regions x steps heat map of the tracked discrepancy, with the final allocation beside it.

    `region_history` is [(step, estimates, probabilities)]; `region_names` label the rows (e.g.
    "3: violin, piano, guitar"). Saves a PNG when `path` is given and returns the RGB image (H, W, 3)
    uint8 for TensorBoard.
    """
    plt = _pyplot()
    stride = max(1, len(region_history) // max_columns)
    history = region_history[::stride]
    steps = [entry[0] for entry in history]
    estimates = np.asarray([entry[1] for entry in history]).T  # regions x steps
    final_probabilities = np.asarray(region_history[-1][2])
    num_regions = estimates.shape[0]

    names = region_names or [str(k) for k in range(num_regions)]
    # A row of about 0.22 in holds 8-point text; the names' column grows with the longest name.
    name_width = 0.07 * max(len(name) for name in names)
    figure, (heat_axis, bar_axis) = plt.subplots(
        1, 2, figsize=(9 + name_width, 1.5 + 0.22 * num_regions), gridspec_kw={"width_ratios": [4, 1]}, sharey=True)
    # Each column is centred on its step; a single column (one recorded step) gets a width of 1.
    half_width = (steps[-1] - steps[0]) / (2 * (len(steps) - 1)) if len(steps) > 1 else 0.5
    mesh = heat_axis.imshow(estimates, aspect="auto", interpolation="nearest", cmap="magma", origin="lower",
                            extent=(steps[0] - half_width, steps[-1] + half_width, -0.5, num_regions - 0.5))
    heat_axis.set_xlabel("step")
    heat_axis.set_ylabel("region: its most distinctive words" if region_names else "region")
    heat_axis.set_yticks(np.arange(num_regions))
    heat_axis.set_yticklabels(names, fontsize=8)
    heat_axis.set_title("tracked teacher-student discrepancy")
    figure.colorbar(mesh, ax=heat_axis, fraction=0.04)
    bar_axis.barh(np.arange(num_regions), final_probabilities, color="tab:blue")
    bar_axis.set_title("sampling prob.")
    return finish_figure(figure, path)


def region_bar_chart(per_region_means, title, path=None, region_names=None):
    """One horizontal bar per region, named by `region_names` (index -> name) when given; returns the RGB
    image, saves a PNG when `path` is given."""
    plt = _pyplot()
    regions = sorted(per_region_means)
    names = [region_names[k] if region_names else str(k) for k in regions]
    figure, axis = plt.subplots(figsize=(6 + 0.07 * max(len(name) for name in names), 1.5 + 0.22 * len(regions)))
    axis.barh(np.arange(len(regions)), [per_region_means[k] for k in regions], color="tab:purple")
    axis.set_yticks(np.arange(len(regions)))
    axis.set_yticklabels(names, fontsize=8)
    axis.invert_yaxis()
    axis.set_ylabel("region")
    axis.set_xlabel("teacher-student noise MSE")
    axis.set_title(title)
    return finish_figure(figure, path)
