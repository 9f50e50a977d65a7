"""Models at run time: building blocks, pretrained backbones, activation capture, checkpoints, devices and losses."""
