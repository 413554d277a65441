"""Convolutional GradICON: the learned baseline that per-pair neural fields are compared with.

A U-Net (:class:`UNet`) predicts a displacement grid from a (moving, fixed) pair; wrappers make
it a multiscale model (:class:`Downsample`, :class:`TwoStep`, :func:`default_model`), which is
trained over a dataset with the finite-difference GradICON or the plain ICON loss
(:func:`train`) and applied to new pairs with :func:`register`, which returns the same
:class:`~neuralfield_reg.RegistrationResult` as :func:`~neuralfield_reg.fit_pair`.

Usage::

    from neuralfield_reg import gradicon
    model = gradicon.default_model(2, (64, 64))
    gradicon.train(model, pairs, time_budget_s=600)
    result = gradicon.register(model, moving, fixed)
"""

from .losses import DEFAULT_LAMBDA, LOSSES, registration_loss
from .networks import UNet
from .register import register
from .train import train
from .wrappers import (DisplacementNet, Downsample, RegistrationNetwork, TwoStep, default_model,
                       downsample, warp)

__all__ = ["DEFAULT_LAMBDA", "DisplacementNet", "Downsample", "LOSSES", "RegistrationNetwork", "TwoStep",
           "UNet", "default_model", "downsample", "register", "registration_loss", "train", "warp"]
