"""A stand-in for torchvision, used only to run diffusers' reference training scripts.

Those scripts need just a few PIL transforms from torchvision. Where no torchvision
build matches the installed torch (this repository's CPU development machines),
``bench_training.py`` puts this folder on the reference run's path instead. The
transforms follow torchvision's semantics for PIL images; on a GPU machine install
the real torchvision that matches torch and this is not used.
"""
