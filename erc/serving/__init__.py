"""A trained model on new conversations (`predict`: `erc predict`)."""
