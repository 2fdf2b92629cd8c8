"""torchvision.transforms.functional.crop for PIL images."""


def crop(image, top, left, height, width):
    return image.crop((left, top, left + width, top + height))


def pil_to_tensor(image):
    """uint8 CHW tensor, as torchvision's (transformers imports it when torchvision is present)."""
    import numpy as np
    import torch

    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
