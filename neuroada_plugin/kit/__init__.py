"""The method kit: what every method builds on, so that a method folder holds only its own math.

* :mod:`.sharded`: a DeepSpeed ZeRO-3 partitioned weight's full shape and values, one layer at a time.
* :mod:`.quantized`: bitsandbytes 4-bit/8-bit layers and their weight as a float tensor;
  :mod:`.bnb_cpu_layout`: bitsandbytes' CPU-packed 4-bit layout, read and undone exactly;
  :mod:`.quantized_write`: a merged weight quantized back into such a layer, the exact restore, and the
  dequantized weight an adapter trained against, reproduced from the full-precision original.
* :mod:`.fingerprint`: the base-weight fingerprint every adapter records (wrong-base detection).
* :mod:`.fused`: when a layer may fold its update into a transient copy of the weight and do one matmul.
* :mod:`.weight_product`: ``a @ W0`` for weight-function methods, reading W0 through the layer in forward
  and again in backward (gathered under ZeRO-3), never keeping it in between.

Importing this package imports nothing; each module imports torch (and only torch) when used.
"""
