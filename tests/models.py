"""Small models written with torch.nn layers, for the convert, compile and end-to-end tests."""
from torch import nn


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm, and a shortcut (1x1 conv when the shape
    changes)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet-style net: a 7x7 stride-2 stem, max-pool, three basic blocks, a depthwise conv, a head."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layers = nn.ModuleList([BasicBlock(width, width), BasicBlock(width, 2 * width, 2),
                                     BasicBlock(2 * width, 2 * width)])
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        x = self.depthwise(x)
        return self.head(x.mean((2, 3)))


def small_convnet(layers, in_channels=3, width=8, num_classes=5):
    """conv-bn-relu-pool twice and a classifier, from the namespace `layers` (torch.nn or torch_cs231n)."""
    return nn.Sequential(
        layers.Conv2d(in_channels, width, 3, padding=1), layers.BatchNorm2d(width), layers.ReLU(),
        layers.MaxPool2d(2),
        layers.Conv2d(width, 2 * width, 3, padding=1, bias=False), layers.BatchNorm2d(2 * width),
        layers.ReLU(inplace=True), layers.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 4 * 4, num_classes),  # for 16x16 inputs
    )
