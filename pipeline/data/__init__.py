"""Inputs stages share: the model fetch, calibration and evaluation text, builtin corpora, task requests."""
