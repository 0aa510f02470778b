"""Data-free knowledge distillation of classifiers (model zoo, generators, synthesizers). Filled by the DFKD issue."""
