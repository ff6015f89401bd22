#!/usr/bin/env python
"""WSSS stage 3: train a transformers segmentation model (SegFormer by default) on pseudo masks, with accelerate.

    accelerate launch examples/generate_cams.py --model out/prompts --dataset synthetic --crf --output_dir cams/
    accelerate launch examples/train_segmentation.py --dataset synthetic --masks cams/ --output_dir seg/ \
        --max_train_steps 300 --checkpointing_steps 50
    accelerate launch examples/train_segmentation.py --dataset voc:/data/VOCdevkit/VOC2012 --masks cams/ \
        --model_name_or_path nvidia/mit-b0 --crop_size 512 --output_dir seg/

Without `--masks` it trains on the dataset's ground-truth masks (the upper bound). The output folder loads with
`pipeline("image-segmentation", model="seg/")`. The training function lives in the package
(`pole_hf.segmentation.train`, also `python -m pole_hf.segmentation.train`), so a wheel install runs it too.
"""

from pole_hf.segmentation.train import main, parse_args, training_function

__all__ = ["main", "parse_args", "training_function"]

if __name__ == "__main__":
    main()
