"""The networks a training run can build, by name: free of Keras, so options and the CLI can list them."""

ARCHITECTURES = ("efficientnet-lite0", "dermnet", "seed")
