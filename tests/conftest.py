import os

if not os.environ.get("JAX_PLATFORMS"):  # unset or empty: the CPU (the CUDA plugin must not probe for a driver)
  os.environ["JAX_PLATFORMS"] = "cpu"
