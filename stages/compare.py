"""Stage compare: both models side by side in metrics/compare.json and metrics/compare.md."""

import json

from inatpipe import paths
from inatpipe.compare import compare_models, to_markdown
from inatpipe.errors import exit_on_user_error


def main() -> None:
    rows = compare_models(
        {name: paths.train_metrics_dir(name) / "metrics.json" for name in paths.MODEL_NAMES},
        {name: paths.eval_metrics_dir(name) / "metrics.json" for name in paths.MODEL_NAMES},
    )
    (paths.METRICS_DIR / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = to_markdown(rows)
    (paths.METRICS_DIR / "compare.md").write_text(table)
    print(table)


if __name__ == "__main__":
    exit_on_user_error(main)
