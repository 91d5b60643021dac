"""Stage train_flexible: FlexibleCNN from scratch with the `train` recipe; keeps the best-on-val checkpoint."""

from inatpipe import distributed, paths
from inatpipe.errors import exit_on_user_error
from inatpipe.experiment import train_with_recipe, training_data
from inatpipe.models import build_model
from inatpipe.params import as_dict, load_params
from inatpipe.runtime import choose_device, seed_everything


def main() -> None:
    p = load_params()
    device = distributed.setup(choose_device(p.device))  # under torchrun: this rank's device
    generator = seed_everything(p.seed)
    data = training_data(p.data, p.train.batch_size, generator, device)
    config = {"image_size": p.data.image_size, **as_dict(p.model)}
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
    )


if __name__ == "__main__":
    exit_on_user_error(main)
