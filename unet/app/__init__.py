"""A local web app for the paper's user response (section 5.3): segment a photo, fix a label with
one press, set the scale with the head oval.

    pip install --no-build-isolation -e ".[app]"
    python -m unet.app --checkpoint runs/small/best.pt      # prints http://127.0.0.1:8000/

* `unet.app.photos`: uploads decoded within stated limits;
* `unet.app.segmentation`: the head oval, the crop it sets, the network and the post-processing,
  the edits and the downloads (no web code);
* `unet.app.server`: the Starlette application and its JSON API;
* ``static/``: the page (plain HTML, JavaScript and canvas; nothing is loaded from the internet).
"""
