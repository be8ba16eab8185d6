"""Transfer Studio's engine: datasets, backbones, training, evaluation and run folders.

Importing this package is cheap: TensorFlow is imported only by the modules that
train, evaluate or predict (`engine.train`, `engine.modeling`, `engine.evaluate`,
`engine.predict`, `engine.pipeline`), never by the modules that read run folders,
so the dashboard's monitoring pages stay light.
"""

__version__ = "0.1.0"
