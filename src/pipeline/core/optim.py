"""SGD with optional momentum (heavy-ball or Nesterov) and weight decay, and
per-epoch learning-rate schedules. The update, for each parameter w with
gradient g (the PyTorch convention):

    g <- g + weight_decay * w      (weights only, not biases)
    v <- momentum * v + g
    w <- w - lr * (g + momentum * v)   if nesterov else   w - lr * v

With momentum 0 this is the lecture's plain step w <- w - lr * g.
"""

import math


class SGD:
    def __init__(self, xp, layers, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        # Velocity buffers are allocated once, not per step.
        self.velocity = [[xp.zeros_like(p) for p in layer] for layer in layers] if momentum else None

    def step(self, layers, grads, lr):
        """Update every (W, b) of `layers` in place."""
        for i, ((W, b), (gW, gb)) in enumerate(zip(layers, grads)):
            if self.weight_decay:
                gW = gW + self.weight_decay * W
            for j, (param, grad) in enumerate(((W, gW), (b, gb))):
                if self.velocity is not None:
                    velocity = self.velocity[i][j]
                    velocity *= self.momentum
                    velocity += grad
                    grad = grad + self.momentum * velocity if self.nesterov else velocity
                param -= lr * grad


def learning_rate(hp, epoch):
    """The learning rate of a 1-based epoch under hp.schedule."""
    if hp.schedule == "constant":
        return hp.lr
    if hp.schedule == "step":  # multiply by gamma every step_epochs epochs
        return hp.lr * hp.gamma ** ((epoch - 1) // hp.step_epochs)
    if hp.schedule == "cosine":  # from lr down towards 0 over the run
        return hp.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / hp.epochs))
    raise ValueError(f"unknown schedule {hp.schedule!r}")
