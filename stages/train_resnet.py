"""Stage train_resnet: ResNet50 transfer learning, frozen backbone (ImageNet weights when available), new head."""

from inatpipe import distributed, paths
from inatpipe.errors import exit_on_user_error
from inatpipe.experiment import train_with_recipe, training_data
from inatpipe.models import build_model
from inatpipe.models.resnet import load_pretrained
from inatpipe.params import load_params
from inatpipe.runtime import choose_device, seed_everything

ARCH = "resnet50"


def main() -> None:
    p = load_params()
    device = distributed.setup(choose_device(p.device))  # under torchrun: this rank's device
    generator = seed_everything(p.seed)
    data = training_data(p.data, p.resnet.batch_size, generator, device)
    config = {"arch": ARCH, "freeze_backbone": True}
    model = build_model("resnet", len(data.classes), config)
    pretrained = load_pretrained(model, p.resnet.weights, ARCH, p.resnet.require_pretrained)
    train_with_recipe(  # the recipe's optimizer takes only the trainable parameters: the head
        model,
        data,
        p.resnet,
        device=device,
        live_dir=paths.train_metrics_dir("resnet"),
        checkpoint=paths.checkpoint("resnet"),
        model_name="resnet",
        model_config=config,
        summary={"pretrained": pretrained},
    )


if __name__ == "__main__":
    exit_on_user_error(main)
