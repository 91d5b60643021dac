"""Stage train_flexible: FlexibleCNN from scratch with Adam; keeps the best-on-val checkpoint."""

import torch

from inatpipe import paths
from inatpipe.errors import exit_on_user_error
from inatpipe.experiment import train_and_track, training_data
from inatpipe.models import build_model
from inatpipe.params import load_params
from inatpipe.runtime import choose_device, configure_threads, seed_everything


def main() -> None:
    p = load_params()
    device = choose_device(p.device)
    generator = seed_everything(p.seed)
    configure_threads()
    data = training_data(p.data, p.train.batch_size, generator, device)
    config = {"image_size": p.data.image_size, **p.model.architecture()}  # num_filters resolved from the pattern
    model = build_model("flexible_cnn", len(data.classes), config)
    optimizer = torch.optim.Adam(model.parameters(), lr=p.train.learning_rate, weight_decay=p.train.weight_decay)
    train_and_track(
        model,
        optimizer,
        data,
        epochs=p.train.epochs,
        device=device,
        live_dir=paths.train_metrics_dir("flexible"),
        checkpoint=paths.checkpoint("flexible"),
        model_name="flexible_cnn",
        model_config=config,
        # What ran, also when a filter pattern chose it; a string, as DVC shows string metrics but drops lists.
        summary={"num_filters": ",".join(map(str, config["num_filters"]))},
    )


if __name__ == "__main__":
    exit_on_user_error(main)
