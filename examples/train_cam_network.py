"""CAM network training (the paper's route) with accelerate: IRN classification, then CLIMS / POLE through CLIP.

    accelerate launch examples/train_cam_network.py --stage classification --dataset synthetic --output_dir out/cls
    python -m pole_hf.cam_network_select --network out/cls --dataset synthetic --out out/selection.json
    accelerate launch examples/train_cam_network.py --stage clims --variant pole --selection out/selection.json \
        --init_network out/cls --dataset synthetic --output_dir out/pole

The loop lives in `pole_hf.cam_network_training` (so `pole-hf train --route camnet` runs it from a wheel install);
copy that module to edit it. Flags: `python examples/train_cam_network.py --help`.
"""

from pole_hf.cam_network_training import main

if __name__ == "__main__":
    main()
