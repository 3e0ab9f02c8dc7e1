"""KV-cache compression of a trained model: calibration, factorisation into h' component heads per layer
(`factor_model`), the layer-sensitivity probe and KV budgets (`probe`, `plan`), layer-wise fit and
distillation (`recover`), and the `mea compress` pipeline (`pipeline`)."""
