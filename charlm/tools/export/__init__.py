"""``charlm export`` (layer 7): a checkpoint in a form other programs read: one step as ONNX (:mod:`.onnx`), a web page
that runs the model (:mod:`.web`, its files in ``assets/``), a safetensors folder with a model card (:mod:`.hub`,
:mod:`.model_card`); :mod:`.staging` checks and stages every format's output."""
