"""Small dense models the tests nest (one definition, shared by the test modules)."""

import torch
from torch import nn


class ConvLinear(nn.Module):
    """conv 3->8 (3x3, pad 1) + relu + linear to 10 classes, for 1x3x6x6 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))
