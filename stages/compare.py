"""Stage compare: both models side by side in metrics/compare.json and metrics/compare.md, and the report a person
reads first, reports/compare.md, with its bar chart."""

import inatpipe.startup  # noqa: F401  (first of the library: see its docstring)
from inatpipe import paths
from inatpipe.atomic import write_json, write_text
from inatpipe.errors import UserError, exit_on_user_error
from inatpipe.evaluation.compare import compare_models, report_markdown, to_markdown
from inatpipe.evaluation.figures import comparison_bars
from inatpipe.params import Params, load_params

BARS = "compare_bars.png"


def run(p: Params) -> None:
    rows = compare_models(
        {name: paths.train_metrics_dir(name) / "metrics.json" for name in paths.MODEL_NAMES},
        {name: paths.eval_metrics_dir(name) / "metrics.json" for name in paths.MODEL_NAMES},
        weights={"resnet": p.resnet.weights},
    )
    write_json(paths.METRICS_DIR / "compare.json", rows)
    table = to_markdown(rows)
    write_text(paths.METRICS_DIR / "compare.md", table)

    per_class = {}
    for name in paths.MODEL_NAMES:
        source = paths.report_dir(name) / "per_class.md"
        if not source.is_file():
            raise UserError(f"{source} not found; run `dvc repro` so every model is evaluated")
        per_class[name] = source.read_text()
    comparison_bars(rows, paths.REPORTS_DIR / BARS)
    write_text(paths.REPORTS_DIR / "compare.md", report_markdown(rows, per_class, BARS))
    print(table)
    print(f"report: {paths.REPORTS_DIR / 'compare.md'}")


if __name__ == "__main__":
    exit_on_user_error(lambda: run(load_params()))
