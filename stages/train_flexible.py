"""Stage train_flexible: FlexibleCNN from scratch with the `train` recipe; keeps the best-on-val checkpoint. As a
trial of `inatpipe sweep run`, it reports every epoch to the study, whose pruner may stop it early."""

import inatpipe.startup  # noqa: F401  (first of the library: see its docstring)
from inatpipe.errors import exit_on_user_error
from inatpipe.params import Params, load_params
from inatpipe.runtime import choose_device, configure_threads, seed_everything
from inatpipe.sweep.trial import trial_judges
from inatpipe.training import distributed
from inatpipe.training.tracking import RunOutputs, train_with_recipe, training_data


def run(p: Params) -> None:
    device = distributed.setup(choose_device(p.device))  # under torchrun: this rank's device
    generator = seed_everything(p.seed)
    configure_threads()
    data = training_data(p.data, p.train.batch_size, generator, device)
    spec = data.spec("flexible_cnn", {"image_size": p.data.image_size, **p.model.architecture()})
    train_with_recipe(
        spec.build(),
        spec,
        data,
        p.train,
        device,
        RunOutputs.of_stage("flexible"),
        # What ran, also when a filter pattern chose it; a string, as DVC shows string metrics but drops lists.
        summary={"num_filters": ",".join(map(str, spec.config["num_filters"]))},
        judges=trial_judges(p.sweep) if distributed.is_main() else (),
    )


if __name__ == "__main__":
    exit_on_user_error(lambda: run(load_params()))
