"""The demo world and the small CLIP trained on it.

* :mod:`mmsearch.demo.world` generates images of coloured shapes, their captions in several phrasings
  (one held out for evaluation), and the demo folder of ``mmsearch demo`` (images, captions, spoken audio,
  and the narrated videos of :mod:`mmsearch.demo.videos`).
* :mod:`mmsearch.demo.train` trains the demo model on CPU; its output ships in ``weights/`` as a plain
  OpenCLIP model config (``mmsearch-demo.json``) and a float16 state dict (``mmsearch-demo.safetensors``).
"""
