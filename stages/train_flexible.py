"""Stage train_flexible: FlexibleCNN from scratch with the `train` recipe; keeps the best-on-val checkpoint."""

from pathlib import Path

from inatpipe import distributed, paths
from inatpipe.errors import exit_on_user_error
from inatpipe.experiment import train_with_recipe, training_data
from inatpipe.models import build_model
from inatpipe.params import load_params
from inatpipe.resume import Resumable, params_sections
from inatpipe.runtime import choose_device, configure_threads, seed_everything

PARAMS = ("seed", "device", "data", "model", "train")  # the params sections this stage reads


def main() -> None:
    p = load_params()
    device = distributed.setup(choose_device(p.device))  # under torchrun: this rank's device
    generator = seed_everything(p.seed)
    configure_threads()
    data = training_data(p.data, p.train.batch_size, generator, device)
    config = {"image_size": p.data.image_size, **p.model.architecture()}  # num_filters resolved from the pattern
    model = build_model("flexible_cnn", len(data.classes), config)
    train_with_recipe(
        model,
        data,
        p.train,
        device=device,
        live_dir=paths.train_metrics_dir("flexible"),
        checkpoint=paths.checkpoint("flexible"),
        model_name="flexible_cnn",
        model_config=config,
        resume=Resumable(paths.resume_state("flexible"), params_sections(p, *PARAMS), Path(__file__)),
        # What ran, also when a filter pattern chose it; a string, as DVC shows string metrics but drops lists.
        summary={"num_filters": ",".join(map(str, config["num_filters"]))},
    )


if __name__ == "__main__":
    exit_on_user_error(main)
