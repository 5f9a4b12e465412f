"""Everything that builds a model. The only package allowed to import TensorFlow."""
