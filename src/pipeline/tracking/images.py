"""Images logged per step into the active MLflow run: the run's Images panel (chart
view) then shows them with a step slider, e.g. the filters evolving over training."""

import logging

import mlflow

log = logging.getLogger(__name__)


def log_image(image, key, step):
    """An RGB uint8 array (height, width, 3) under `key` at `step`, written before returning."""
    mlflow.log_image(image, key=key, step=step, synchronous=True)


class EpochImages:
    """An on_epoch callback: render(epoch) (an RGB array) logged under `key` with
    step=epoch every `every` epochs and after epoch `last`; every <= 0: never.
    render runs only on those epochs. A failed write is a warning, never the
    end of a training: the pictures are for looking at, the metrics are the record."""

    def __init__(self, key, every, last, render):
        self.key, self.every, self.last, self.render = key, every, last, render

    def due(self, epoch):
        return self.every > 0 and (epoch % self.every == 0 or epoch == self.last)

    def __call__(self, epoch, row=None):
        if not self.due(epoch):
            return
        image = self.render(epoch)  # a bug in drawing surfaces; a store that fails does not
        try:
            log_image(image, self.key, epoch)
        except Exception as err:  # MlflowException, OSError, connection errors
            log.warning("MLflow did not take the %s image of epoch %d: %s", self.key, epoch, str(err)[:300])
