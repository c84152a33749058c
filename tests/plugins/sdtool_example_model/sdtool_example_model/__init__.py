"""An sdtool model plugin: a tiny CNN cut into stages with exits by `sdtool.models.wrap.wrap_model`.

`pyproject.toml` registers `example_tiny_cnn` under the entry-point group `sdtool.models`; sdtool loads it
the first time a command looks up a name it does not know, or lists the models.
"""

from __future__ import annotations

from torch import nn

from sdtool.models.wrap import wrap_model


class TinyCNN(nn.Module):
    """Three conv blocks (the exit points) and a classifier; `wrap_model` replaces the classifier."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.block1 = block(3, width, 1)
        self.block2 = block(width, 2 * width, 2)
        self.block3 = block(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.pool(x).flatten(1))


def example_tiny_cnn(
    num_classes: int = 10,
    width: int = 8,
    head: str = "light",
    attention: bool = True,
    exits: list[int] | None = None,
    input_size: int = 32,
):
    """Example plugin: a 3-block CNN of base width `width`, exits after block1 and block2."""
    # Every argument is recorded in the checkpoint (model.spec), so the same call rebuilds the network.
    net = TinyCNN(num_classes, width)
    return wrap_model(net, ["block1", "block2"], num_classes, head, attention, input_size, exits)
