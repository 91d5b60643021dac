"""Stage compare: both models side by side in metrics/compare.json and metrics/compare.md."""

from inatpipe import paths
from inatpipe.atomic import write_json, write_text
from inatpipe.compare import compare_models, to_markdown
from inatpipe.errors import exit_on_user_error


def main() -> None:
    rows = compare_models(
        {name: paths.train_metrics_dir(name) / "metrics.json" for name in paths.MODEL_NAMES},
        {name: paths.eval_metrics_dir(name) / "metrics.json" for name in paths.MODEL_NAMES},
    )
    write_json(paths.METRICS_DIR / "compare.json", rows)
    table = to_markdown(rows)
    write_text(paths.METRICS_DIR / "compare.md", table)
    print(table)


if __name__ == "__main__":
    exit_on_user_error(main)
