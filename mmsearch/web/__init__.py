"""The web page `mmsearch serve` serves (plain HTML, JS and CSS, loaded with importlib.resources)."""
