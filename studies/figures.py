"""Per-rating pictures of reports (matplotlib, Agg backend: no display needed).

Top: RMSE per true rating value, one line per method. Bottom: the mean prediction per true rating value
against the diagonal; a model that collapses to the middle draws a flat line there.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _draw(rmse_axes, prediction_axes, reports, title, dashed=()):
    """One column: every {label: report} on the same two axes; the labels in `dashed` drawn dashed."""
    low, high = None, None
    for label, report in reports.items():
        ratings = sorted(report["per_rating"], key=float)
        values = [float(r) for r in ratings]
        style = {"marker": "o", "label": label, "linestyle": "--" if label in dashed else "-",
                 "markersize": 3 if label in dashed else 5}
        rmse_axes.plot(values, [report["per_rating"][r]["rmse"] for r in ratings], **style)
        prediction_axes.plot(values, [report["per_rating"][r]["mean_prediction"] for r in ratings], **style)
        low = min(values[0], low if low is not None else values[0])
        high = max(values[-1], high if high is not None else values[-1])
    if low is not None:
        prediction_axes.plot([low, high], [low, high], color="black", linestyle=":", label="diagonal")
    rmse_axes.set_title(title)
    rmse_axes.set_ylabel("RMSE")
    prediction_axes.set_ylabel("mean prediction")
    prediction_axes.set_xlabel("true rating")
    rmse_axes.grid(alpha=0.3)
    prediction_axes.grid(alpha=0.3)


def report_figure(report, title="validation"):
    """The two panels of one report (TensorBoard's add_figure closes it)."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 6), sharex=True)
    _draw(top, bottom, {"model": report}, title)
    figure.tight_layout()
    return figure


def comparison_figure(panels, path, dashed=()):
    """One column per backbone ({backbone: {method label: report}}), saved as PNG to `path`; the methods
    in `dashed` (the baselines without a network) drawn dashed. One legend below all columns."""
    figure, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7.5), sharex=True, squeeze=False)
    for column, (backbone, reports) in enumerate(panels.items()):
        _draw(axes[0, column], axes[1, column], reports, backbone, dashed)
    handles, labels = axes[1, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize="small")
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
