"""torchvision.transforms.functional for PIL images: what the reference scripts call.

``crop`` (FLUX.1, SD3, SDXL); ``resize``, ``center_crop``, ``hflip``, ``to_tensor`` and
``normalize`` (FLUX.2 klein, Z-Image, Qwen-Image, which call them as ``TF.…``). Each is the
class of the same name in ``transforms`` applied once, so the two cannot differ.
"""


def crop(image, top, left, height, width):
    return image.crop((left, top, left + width, top + height))


def resize(image, size, interpolation=None):
    from torchvision import transforms

    return transforms.Resize(size, interpolation or transforms.InterpolationMode.BILINEAR)(image)


def center_crop(image, size):
    from torchvision import transforms

    return transforms.CenterCrop(size)(image)


def hflip(image):
    from PIL import Image

    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_tensor(image):
    from torchvision import transforms

    return transforms.ToTensor()(image)


def normalize(tensor, mean, std):
    from torchvision import transforms

    return transforms.Normalize(mean, std)(tensor)


def pil_to_tensor(image):
    """uint8 CHW tensor, as torchvision's (transformers imports it when torchvision is present)."""
    import numpy as np
    import torch

    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
