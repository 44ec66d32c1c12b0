"""Images logged per step into an MLflow run: the run's Images panel (chart view)
then shows them with a step slider, e.g. the filters evolving over training."""


class EpochImages:
    """An on_epoch callback: render(epoch) (an RGB array) handed to log(image, key,
    step=epoch) every `every` epochs and after epoch `last`; every <= 0: never.
    render runs only on those epochs, in the loop (it draws the layers as they are
    now); log is EpochLog.image, which writes in the background and turns a failed
    write into a warning: the pictures are for looking at, the metrics are the record."""

    def __init__(self, key, every, last, render, log):
        self.key, self.every, self.last, self.render, self.log = key, every, last, render, log

    def due(self, epoch):
        return self.every > 0 and (epoch % self.every == 0 or epoch == self.last)

    def __call__(self, epoch, row=None):
        if self.due(epoch):
            self.log(self.render(epoch), self.key, epoch)
