"""Frozen timm backbones: built from a name and a checkpoint, weights from elsewhere (timm by
name, other layouts, `fercache convert`), and which features are read out of them."""
