"""Mutation testing of the core modules with mutmut (configured in pyproject.toml's ``[tool.mutmut]``); not in CI.

    nice -n 10 python benchmarks/mutation.py                 # every core module, one worker
    nice -n 10 python benchmarks/mutation.py --focus         # only each module's FOCUS functions
    python benchmarks/mutation.py caa loading                # some modules
    python benchmarks/mutation.py --report --focus           # the table of the last run, no mutants run

mutmut copies ``src/`` to ``mutants/``, records in one pass over the selected test files which tests call which
function, then runs each mutant against only those tests. Named mutants are always rerun: ``--resume`` names only
those the last run left without a verdict. This script runs one ``mutmut run`` over the modules' name globs and
prints a Markdown table: mutants, not run yet, killed, equivalent (listed below with the reason, not counted),
surviving, score = killed / (killed + surviving). mutmut numbers mutants per function: after editing a module,
recheck the equivalent list with ``mutmut show NAME``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["caa", "cam", "_last_block_backward", "_clip_internals", "cam_inference", "image_processing_pole",
        "modeling_pole", "objective", "masks", "evaluation", "prompt_learner", "selection", "loading", "data/voc",
        "data/spec", "cam_network_objective", "modeling_pole_cam_network"]
# mutmut exit codes counted as killed: test failure, pytest internal error, caught by the type check, and the
# timeouts (a mutant that hangs, e.g. a labelling loop that never converges, is detected by the suite)
KILLED = {1, 3, 37, 36, 24, -24, 152, 255}

# --focus: the functions that carry each module's behaviour (for a run that fits an hour on a busy 2-core machine);
# left out: I/O, argument plumbing, __init__ bookkeeping, tables and repr
FOCUS = {
    "caa": ["*"],
    "cam": ["*"],
    "_last_block_backward": ["*"],
    "_clip_internals": ["*"],
    "cam_inference": ["*"],
    "image_processing_pole": ["xǁPoleImageProcessorǁfor_model", "xǁPoleImageProcessorǁbackground_rule",
                              "xǁPoleImageProcessorǁvariants", "xǁPoleImageProcessorǁcomputation_size",
                              "xǁPoleImageProcessorǁpixel_values", "xǁPoleImageProcessorǁpreprocess",
                              "xǁPoleImageProcessorǁpost_process_cams", "xǁPoleImageProcessorǁsegment",
                              "xǁPoleImageProcessorǁpost_process_semantic_segmentation", "x_check_scales",
                              "x_check_max_side"],
    "modeling_pole": ["xǁPolePromptModelǁtrain", "xǁPolePromptModelǁlearnable_parameters",
                      "xǁPolePromptModelǁset_class_words", "xǁPolePromptModelǁencode_prompt_embeddings",
                      "xǁPolePromptModelǁ_prompt_state", "xǁPolePromptModelǁ_background_features",
                      "xǁPolePromptModelǁget_text_features", "xǁPolePromptModelǁimage_features_from_tokens",
                      "xǁPolePromptModelǁget_image_features", "xǁPolePromptModelǁget_logit_scale",
                      "xǁPolePromptModelǁget_cams", "xǁPolePromptModelǁforward", "x_multilabel_softmax_loss"],
    "objective": ["x_cbs_loss", "x_btm_loss", "x_otm_loss", "x_masked_images", "x_check_pairs", "x_pairs_from_lists",
                  "x_pairs_from_cams", "xǁPoleObjectiveǁlosses", "xǁPoleObjectiveǁforward"],
    "masks": ["x_background_score", "x_class_scores", "x_scores_to_mask", "x_cams_to_mask", "x_crf_image"],
    "evaluation": ["xǁConfusionMatrixǁupdate", "xǁConfusionMatrixǁiou", "xǁConfusionMatrixǁprecision",
                   "xǁConfusionMatrixǁclass_accuracy", "xǁConfusionMatrixǁmiou",
                   "xǁConfusionMatrixǁpixel_accuracy", "xǁThresholdSweepǁbest", "x__best_of"],
    "prompt_learner": ["xǁPolePromptLearnerǁclass_prompt_embeddings", "x_pad_id_rows", "xǁPoleAdapterǁforward",
                       "xǁPolePromptLearnerǁset_class_tail", "x_init_class_vectors", "x_tokenize_template",
                       "x_tokenize_word", "xǁPolePromptLearnerǁresize_class_tokens",
                       "xǁPolePromptLearnerǁset_class_word", "xǁPolePromptLearnerǁinitialize"],
    "selection": ["x_masked_pixel_values", "x_resolve_candidates", "xǁSelectionResultǁsummary"],
    "loading": ["x_load_prompt_tensors", "x__check_id_tensors", "x_check_base_matches", "x_prompt_state_dict"],
    "data/voc": ["x__labels_from_mask", "x__split_file", "x__read_labels", "x__read_ids", "x__find_voc_root"],
    "data/spec": ["x__read_mask", "x_example_ids", "x_class_names_of", "x__example_id", "x__read",
                  "x_load_dataset_spec"],
    "cam_network_objective": ["x_pair_maps", "x_variant_options", "x_freeze_for_variant", "x_word_text_features",
                              "xǁCamNetworkObjectiveǁforward"],
    "modeling_pole_cam_network": ["x__keep_last_stage_resolution", "xǁPoleCamNetworkǁ_freeze_stem",
                                  "xǁPoleCamNetworkǁtrain", "xǁPoleCamNetworkǁparameter_groups",
                                  "xǁPoleCamNetworkǁforward", "xǁPoleCamNetworkǁget_cams"],
}

# mutants no behaviour can tell apart from the original (name -> reason); excluded from the score
_PROMOTION = "bool * float (or float32 * float64) promotes to the same dtype the cast gave"
_SENTINEL = "a min/max start value beyond every coordinate: the result is the same"
EQUIVALENT: dict[str, str] = {
    "pole_hf.caa.x_label_regions__mutmut_3": "dtype=bool dropped: every read of the mask is np.where(mask, ...), "
                                             "which takes the same truth values",
    "pole_hf.caa.x_label_regions__mutmut_5": "as mutmut_3 (dtype argument removed)",
    "pole_hf.caa.x_label_regions__mutmut_20": "the initial background label is never read (np.where(mask, labels, "
                                              "big) hides it) and the first pass writes -1 (one more pass only)",
    "pole_hf.caa.x_label_regions__mutmut_21": "as mutmut_20 (-2 instead of +1)",
    "pole_hf.caa.x_label_regions__mutmut_60": "label 0 belongs to pixel 0 only, whose own label is 0: not following "
                                              "it changes nothing",
    "pole_hf.caa.x_label_regions__mutmut_61": "as mutmut_60 (>= 1 is > 0 on integers)",
    "pole_hf.caa.x_region_boxes__mutmut_16": "float boxes: every value is an integer converted by int()",
    "pole_hf.caa.x_region_boxes__mutmut_18": "as mutmut_16 (dtype argument removed)",
    "pole_hf.caa.x_region_boxes__mutmut_24": _SENTINEL,
    "pole_hf.caa.x_region_boxes__mutmut_26": _SENTINEL,
    "pole_hf.caa.x_region_boxes__mutmut_30": _SENTINEL,
    "pole_hf.caa.x_refine_with_affinity__mutmut_5": _PROMOTION,
    "pole_hf.caa.x_refine_with_transition__mutmut_5": _PROMOTION,
    "pole_hf.caa.x_refine_with_transition__mutmut_14": _PROMOTION,
    "pole_hf.caa.x_transition_from_attention__mutmut_12": "a dim-0 sum without keepdim broadcasts as a row: the "
                                                          "same column division",
    "pole_hf.caa.x_transition_from_attention__mutmut_14": "as mutmut_12 (keepdim=False)",
    "pole_hf.masks.x_crf_image__mutmut_16": "np.array copies by default: copy=True removed changes nothing",
    "pole_hf.masks.x_crf_image__mutmut_18": "numpy reads order='c' as 'C'",
    "pole_hf.selection.x_masked_pixel_values__mutmut_21": "dtype=None for the all-zero image indices: "
                                                          "check_pairs casts them to long",
    "pole_hf.selection.x_masked_pixel_values__mutmut_23": "as mutmut_21 (argument removed)",
    "pole_hf._last_block_backward.x_gradcam_weights__mutmut_39": "einsum reads upper-case subscripts as labels too",
    "pole_hf._last_block_backward.x_attention_backward__mutmut_91": "as gradcam_weights 39 (upper-case einsum labels)",
    "pole_hf._last_block_backward.x_attention_backward__mutmut_104": "as gradcam_weights 39",
    "pole_hf._last_block_backward.x_attention_backward__mutmut_117": "as gradcam_weights 39",
    "pole_hf._last_block_backward.x_attention_backward__mutmut_157": "as gradcam_weights 39",
    "pole_hf._last_block_backward.x_attention_backward__mutmut_169": "as gradcam_weights 39",
    "pole_hf._last_block_backward.x_attention_backward__mutmut_51": "a fourth sum buffer, never filled: the zip "
                                                                    "with the 3 projections drops it",
    "pole_hf.prompt_learner.x_init_class_vectors__mutmut_7": "n == length through the split branch: length groups of "
                                                             "one token, each mean the token itself",
    "pole_hf.prompt_learner.x_pad_id_rows__mutmut_10": "torch.full infers int64 from the integer pad id",
    "pole_hf.prompt_learner.x_pad_id_rows__mutmut_14": "as mutmut_10 (argument removed)",
    "pole_hf.prompt_learner.x_pad_id_rows__mutmut_19": "the row is written into a long tensor: the assignment casts it",
    "pole_hf.prompt_learner.x_pad_id_rows__mutmut_21": "as mutmut_19 (argument removed)",
    "pole_hf.prompt_learner.x_tokenize_template__mutmut_6": "the guard only skips a call: the tokenizer gives [] for "
                                                            "an empty text",
    "pole_hf.prompt_learner.x_tokenize_template__mutmut_14": "as mutmut_6, for the suffix",
    "pole_hf.prompt_learner.xǁPolePromptLearnerǁclass_prompt_embeddings__mutmut_9": "torch.cat's default dim is 0",
    "pole_hf.prompt_learner.xǁPolePromptLearnerǁclass_prompt_embeddings__mutmut_56": "shape[+1] of a 2-D [n, D] "
                                                                                     "embedding is shape[-1]",
    "pole_hf.prompt_learner.xǁPolePromptLearnerǁclass_prompt_embeddings__mutmut_62": "torch.cat's default dim is 0",
    "pole_hf.loading.x_load_prompt_tensors__mutmut_33": "every id tensor's name has two parts "
                                                        "(prompt_learner.<name>): [+1] is [-1]",
    "pole_hf.loading.x_load_prompt_tensors__mutmut_104": "shape[+1] of the 2-D [C, L] tail ids is shape[-1]",
    "pole_hf.loading.x_load_prompt_tensors__mutmut_130": "the context was just replaced by the file's tensor: copying "
                                                         "it again copies the same values",
    "pole_hf.loading.x_load_prompt_tensors__mutmut_131": "as mutmut_130",
    "pole_hf.loading.x_load_prompt_tensors__mutmut_133": "copy_ casts to the parameter's dtype anyway",
    "pole_hf.loading.x_load_prompt_tensors__mutmut_68": "only a file with zero class-token slots differs, and it is "
                                                        "refused either way (the shape check or, under the mutant, "
                                                        "the class_token_lengths check right after)",
    "pole_hf.prompt_learner.xǁPolePromptLearnerǁset_class_tail__mutmut_13": "the tail ids' padding is never read "
                                                                            "(tail_embeds[index, :tail]); ids 0 "
                                                                            "and 1 both lie in every vocabulary",
    "pole_hf.data.voc.x__read_ids__mutmut_7": "'UTF-8' and 'utf-8' name the same codec",
    "pole_hf.masks.x_crf_image__mutmut_21": "float64 instead of float32 for uint8 minus the Caffe mean: the results "
                                            "lie >= 0.008 from an integer, far beyond float32 error: trunc agrees",
    "pole_hf.data.spec.x__read__mutmut_2": "exif=None: load_image's `if exif:` reads None as False",
    "pole_hf.data.spec.x__read__mutmut_11": "as mutmut_2 (the bytes branch)",
    "pole_hf.data.spec.x__read__mutmut_23": "as mutmut_2 (the path branch)",
    "pole_hf.data.spec.x_load_dataset_spec__mutmut_62": "a synthetic dataset already has num_images examples: "
                                                        "select(range(min(n, n))) keeps them all",
    "pole_hf.data.spec.x_load_dataset_spec__mutmut_67": "as mutmut_62 (the kind string changed)",
    "pole_hf.data.spec.x_load_dataset_spec__mutmut_68": "as mutmut_62 (the kind string changed)",
    "pole_hf.masks.x_crf_image__mutmut_32": "np.mod of the float trunc is an integer in [0, 256): the uint8 cast "
                                            "agrees with the int64 route",
    # CAM modules (session 21; cam renumbered in session 24)
    "pole_hf.cam.x_gradcam__mutmut_15": "caa_layers set without refine: vision_prefix computes attention nobody "
                                        "reads (explicit-attention blocks: the same hidden states to float rounding)",
    "pole_hf.cam.x_gradcam__mutmut_20": "caa_layers=1 without refine counts only the last block, which "
                                        "vision_prefix does not run: no explicit attention, None either way",
    "pole_hf.cam.x_gradcam__mutmut_55": "F.normalize of the [B, D] features: dim=+1 is dim=-1",
    "pole_hf.cam.x_gradcam__mutmut_120": "picked is float32 (logits.float().softmax): torch.zeros' default dtype "
                                         "is the same",
    "pole_hf.cam.x_gradcam__mutmut_125": "as mutmut_120 (argument removed)",
    "pole_hf.cam.x_gradcam__mutmut_53": "F.normalize's default dim is 1, the last of the [B, D] features",
    "pole_hf.cam.x_gradcam__mutmut_67": "softmax(+1) of the 2-D [B, C + background] logits is softmax(-1)",
    "pole_hf.cam.x_gradcam__mutmut_104": "float('-INF') is float('-inf')",
    "pole_hf.cam.x_gradcam__mutmut_105": "as mutmut_67",
    "pole_hf.cam.x_gradcam__mutmut_174": "einsum reads upper-case subscripts as labels too",
    "pole_hf.cam.x_padded_targets__mutmut_4": "as mutmut_7 (dtype=None)",
    "pole_hf.cam.x_padded_targets__mutmut_18": "the row is written into a long tensor: the assignment casts it",
    "pole_hf.cam.x_padded_targets__mutmut_20": "as mutmut_18 (argument removed)",
    "pole_hf.cam.x_padded_targets__mutmut_7": "torch.full infers int64 from the integer fill -1: dtype=torch.long "
                                              "changes nothing",
    "pole_hf.cam_inference.x_image_cams__mutmut_22": "one image: batch_size 2 is one chunk of one too",
    "pole_hf._clip_internals.x_clip_es_position_embeddings__mutmut_3": "isqrt(n + 1) == isqrt(n - 1) when n - 1 is a "
                                                                       "square; other tables are refused either way",
    "pole_hf._clip_internals.x_clip_es_position_embeddings__mutmut_21": "a [2, D/2, s, s] grid resizes per channel as"
                                                                        " [1, D, s, s] does and reshapes back in the "
                                                                        "same order",
    "pole_hf._clip_internals.x_clip_es_position_embeddings__mutmut_28": "align_corners=None is bilinear's default, "
                                                                        "False",
    "pole_hf._clip_internals.x_clip_es_position_embeddings__mutmut_32": "as mutmut_28 (argument removed)",
    "pole_hf._clip_internals.x_vision_output_tokens__mutmut_5": "CLIPVisionEmbeddings casts the pixels to the patch "
                                                                "weights' dtype itself",
    "pole_hf._clip_internals.x_causal_mask__mutmut_4": "a float32 mask of the dtype's minimum gives the same "
                                                       "attention (bfloat16 text tower checked by test_word_features_"
                                                       "go_through_a_changed_context_the_adapter_and_a_half_precision"
                                                       "_clip)",
    "pole_hf._clip_internals.x_causal_mask__mutmut_8": "as mutmut_4 (argument removed)",
    "pole_hf.modeling_pole.xǁPolePromptModelǁ_background_features__mutmut_7": "no background words give [0, 0] ids "
                                                                              "(pad_id_rows of no rows): shape[1] is "
                                                                              "0 exactly when shape[0] is",
    "pole_hf.modeling_pole.xǁPolePromptModelǁ_background_features__mutmut_14": "torch.cat skips a 1-D empty tensor: "
                                                                               "[0] and [0, P] zeros concatenate "
                                                                               "alike",
    "pole_hf.modeling_pole.xǁPolePromptModelǁget_image_features__mutmut_9": "F.normalize's default dim is 1, the last"
                                                                            " of the [N, D] features",
    "pole_hf.modeling_pole.xǁPolePromptModelǁget_image_features__mutmut_14": "as mutmut_9 (dim=+1)",
    "pole_hf.modeling_pole.xǁPolePromptModelǁforward__mutmut_11": "text and image embeddings share the model's dtype "
                                                                  "(adapters return their input's)",
    "pole_hf.modeling_pole.xǁPolePromptModelǁforward__mutmut_21": "the labels are written into a float targets "
                                                                  "tensor: the assignment casts them",
    "pole_hf.modeling_pole.x_multilabel_softmax_loss__mutmut_12": "with no background columns the slice num_classes: "
                                                                  "is empty: the assignment does nothing",
    "pole_hf.modeling_pole.x_multilabel_softmax_loss__mutmut_14": "the targets are normalised by their row sum: 2.0 "
                                                                  "and 1.0 give the same spread",
    "pole_hf.modeling_pole.x_multilabel_softmax_loss__mutmut_35": "log_softmax(+1) of the 2-D logits is "
                                                                  "log_softmax(-1)",
    "pole_hf.image_processing_pole.xǁPoleImageProcessorǁfor_model__mutmut_5": "every PretrainedConfig has model_type:"
                                                                              " getattr without a default never "
                                                                              "raises",
    "pole_hf.image_processing_pole.xǁPoleImageProcessorǁfor_model__mutmut_42": "None for a flag transformers reads as"
                                                                               " `if not ...` (as mutmut_43)",
    "pole_hf.image_processing_pole.xǁPoleImageProcessorǁpixel_values__mutmut_4": "resizing a PIL image to its own "
                                                                                 "size returns the same pixels",
    "pole_hf.image_processing_pole.xǁPoleImageProcessorǁpixel_values__mutmut_6": "resample=None is PIL's default for "
                                                                                 "RGB, bicubic",
    "pole_hf.image_processing_pole.xǁPoleImageProcessorǁpixel_values__mutmut_8": "as mutmut_6 (argument removed)",
    "pole_hf.image_processing_pole.xǁPoleImageProcessorǁpost_process_cams__mutmut_48": "align_corners=None is "
                                                                                       "bilinear's default, False",
    "pole_hf.image_processing_pole.xǁPoleImageProcessorǁpost_process_cams__mutmut_52": "as mutmut_48 (argument "
                                                                                       "removed)",
    "pole_hf.cam_inference.x_image_cams__mutmut_13": "one image: batch_size 1 or the default 8 is one chunk of one",
    "pole_hf.image_processing_pole.xǁPoleImageProcessorǁpost_process_cams__mutmut_25": "cams are [B, K, h, w]: "
        "shape[+2:] is shape[-2:]",
    "pole_hf.image_processing_pole.xǁPoleImageProcessorǁfor_model__mutmut_55": "codec names are case-insensitive: "
        "'UTF-8' is 'utf-8'",
    "pole_hf.image_processing_pole.xǁPoleImageProcessorǁfor_model__mutmut_43": "cached_file reads "
        "_raise_exceptions_for_connection_errors only as `if not ...`: None is False",
    "pole_hf.modeling_pole.xǁPolePromptModelǁget_text_features__mutmut_31": "F.normalize's default dim=1 is dim=-1 "
        "on the [C + B, D] features",
    "pole_hf.modeling_pole_cam_network.x__keep_last_stage_resolution__mutmut_5": "any stride other than (1, 1) "
        "is set to (1, 1) either way; setting (1, 1) to (1, 1) is a no-op",
    "pole_hf.modeling_pole_cam_network.x__keep_last_stage_resolution__mutmut_6": "as mutmut_5",
    "pole_hf.objective.x_masked_images__mutmut_14": "pixels are [N, 3, H, W]: shape[2:] is shape[-2:]",
    "pole_hf.objective.x_masked_images__mutmut_15": "(3, H, W) never equals size: the resize then runs at the same "
                                                    "size too, an exact identity",
    "pole_hf.objective.x_masked_images__mutmut_22": "align_corners=None is bilinear's default, False",
    "pole_hf.objective.x_masked_images__mutmut_26": "as mutmut_22 (argument removed)",
    "pole_hf.objective.x_masked_images__mutmut_38": "maps are [P, 1, h, w]: shape[2:] is shape[-2:]",
    "pole_hf.objective.x_masked_images__mutmut_39": "as mutmut_15, for the maps ((1, h, w) never equals (H, W): a "
                                                    "same-size resize)",
    "pole_hf.objective.x_masked_images__mutmut_42": "as mutmut_14",
    "pole_hf.objective.x_masked_images__mutmut_43": "as mutmut_39 ((3, H, W) never equals (h, w): a same-size resize)",
    "pole_hf.objective.x_masked_images__mutmut_48": "as mutmut_22, for the maps",
    "pole_hf.objective.x_masked_images__mutmut_52": "as mutmut_22, for the maps (argument removed)",
    "pole_hf.objective.x_masked_images__mutmut_53": "as mutmut_14 (the resize target)",
    "pole_hf.objective.x_masked_images__mutmut_66": "a CPU index selects from a tensor on any device (the index's "
                                                    "device is moot)",
    "pole_hf.objective.x_masked_images__mutmut_80": "a [3, 1, 1] mean broadcasts against [P, 3, H, W] as [1, 3, 1, 1] "
                                                    "does",
    "pole_hf.objective.x_masked_images__mutmut_100": "as mutmut_80, for std",
    "pole_hf.objective.x_pairs_from_lists__mutmut_30": "no images: any [0, h, w] tensor is no maps",
    "pole_hf.objective.x_pairs_from_lists__mutmut_31": "as mutmut_30",
    "pole_hf.objective.x_pairs_from_lists__mutmut_46": "torch.full infers int64 from an int fill value: dtype=long is "
                                                       "the default",
    "pole_hf.objective.x_pairs_from_lists__mutmut_49": "as mutmut_46 (argument removed)",
    "pole_hf.objective.xǁPoleObjectiveǁlosses__mutmut_8": "the empty path: fg has no rows, fg.sum() is 0 whatever its "
                                                          "sign or factor",
    "pole_hf.objective.xǁPoleObjectiveǁlosses__mutmut_12": "as mutmut_8",
    "pole_hf.objective.xǁPoleObjectiveǁlosses__mutmut_36": "as masked_images mutmut_66 (a CPU index selects on any "
                                                           "device)",
    "pole_hf.objective.xǁPoleObjectiveǁlosses__mutmut_40": "features are [P, D]: sum(1) is sum(-1)",
    "pole_hf.objective.xǁPoleObjectiveǁlosses__mutmut_45": "as mutmut_40",
    "pole_hf.objective.xǁPoleObjectiveǁlosses__mutmut_58": "no background prompts: fg @ background.t() is [P, 0], "
                                                           "whose CBS sum and count are 0, as the branch's",
    "pole_hf.objective.xǁPoleObjectiveǁforward__mutmut_47": "the no-pairs features: losses' empty path reads only "
                                                            "their row count, 0",
    "pole_hf.objective.xǁPoleObjectiveǁforward__mutmut_49": "the no-pairs features: losses' empty path reads only "
                                                            "their row count, 0",
    "pole_hf.objective.xǁPoleObjectiveǁforward__mutmut_50": "the no-pairs features: losses' empty path reads only "
                                                            "their row count, 0",
    "pole_hf.objective.xǁPoleObjectiveǁforward__mutmut_54": "the no-pairs path: losses returns zeros before reading "
                                                            "class_indices, num_classes or pair_share",
    "pole_hf.objective.xǁPoleObjectiveǁforward__mutmut_55": "the no-pairs path: losses returns zeros before reading "
                                                            "class_indices, num_classes or pair_share",
    "pole_hf.objective.xǁPoleObjectiveǁforward__mutmut_56": "the no-pairs path: losses returns zeros before reading "
                                                            "class_indices, num_classes or pair_share",
    "pole_hf.objective.xǁPoleObjectiveǁforward__mutmut_60": "the no-pairs path: losses returns zeros before reading "
                                                            "class_indices, num_classes or pair_share",
    "pole_hf.objective.xǁPoleObjectiveǁforward__mutmut_61": "the no-pairs path: losses returns zeros before reading "
                                                            "class_indices, num_classes or pair_share",
    "pole_hf.objective.xǁPoleObjectiveǁforward__mutmut_62": "the no-pairs path: losses returns zeros before reading "
                                                            "class_indices, num_classes or pair_share",
    "pole_hf.cam_network_objective.x_word_text_features__mutmut_11": "torch.cat's default dim is 0",
    "pole_hf.cam_network_objective.x_word_text_features__mutmut_40": "prefix is [T, D]: shape[1] is shape[-1]",
    "pole_hf.cam_network_objective.x_word_text_features__mutmut_66": "features are [N, D]: F.normalize's default dim=1 "
                                                                     "is dim=-1",
    "pole_hf.cam_network_objective.x_word_text_features__mutmut_67": "as mutmut_66",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_15": "detach=None is falsy as False: the maps "
                                                                              "stay in the graph either way",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_42": "the word bank and the background come "
                                                                              "from the same text model and adapter: "
                                                                              "one dtype",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_45": "torch.tensor of Python ints is int64; "
                                                                              "an empty list (float) only reaches "
                                                                              "losses' empty path, which does not read "
                                                                              "it",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_48": "as mutmut_45 (argument removed)",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_46": "losses moves class_indices to the "
                                                                              "text's device itself",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_49": "as mutmut_46 (argument removed)",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_59": "the no-pairs features have no rows: "
                                                                              "adding or subtracting 0 * sum changes "
                                                                              "nothing",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_68": "as mutmut_59: * 1.0 is broadcast onto "
                                                                              "no element (the gradient stays 0)",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_63": "the no-pairs features: losses' empty "
                                                                              "path reads only their row count, 0",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_65": "as mutmut_63",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_66": "as mutmut_63",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_72": "the no-pairs path: losses returns zeros "
                                                                              "before reading class_indices or "
                                                                              "num_classes",
    "pole_hf.cam_network_objective.xǁCamNetworkObjectiveǁforward__mutmut_73": "as mutmut_72",
}


def module_prefix(module: str) -> str:
    return "pole_hf." + module.replace("/", ".") + "."


def meta_path(module: str) -> Path:
    return ROOT / "mutants" / "src" / "pole_hf" / f"{module}.py.meta"


def patterns(module: str, focus: bool) -> list[str]:
    """mutmut's name globs for a module's mutants (all, or its FOCUS functions)."""
    if not focus or FOCUS[module] == ["*"]:
        return [module_prefix(module) + "*"]
    return [f"{module_prefix(module)}{function}__mutmut_*" for function in FOCUS[module]]


def module_report(module: str, focus: bool) -> dict:
    path = meta_path(module)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python benchmarks/mutation.py {module}` first")
    codes = json.loads(path.read_text())["exit_code_by_key"]
    codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns(module, focus))}
    equivalent = sorted(name for name in codes if name in EQUIVALENT)
    not_run = sorted(name for name, code in codes.items() if code is None and name not in EQUIVALENT)
    killed = sorted(name for name, code in codes.items() if code in KILLED and name not in EQUIVALENT)
    surviving = sorted(name for name, code in codes.items()
                       if code is not None and code not in KILLED and name not in EQUIVALENT)
    counted = len(killed) + len(surviving)  # score over the mutants run, equivalent ones excluded
    return {"module": module, "mutants": len(codes), "not_run": len(not_run), "killed": len(killed),
            "equivalent": equivalent, "surviving": {name: codes[name] for name in surviving},
            "score": len(killed) / counted if counted else float("nan")}


def run_mutmut(names: list[str], max_children: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", POLE_HF_TINY_CLIP_CACHE=str(ROOT / "mutants" / "tiny-clip"))
    env.pop("PYTHONPATH", None)  # mutmut puts mutants/src first and must not see another pole_hf
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=False)
    if result.returncode:
        raise SystemExit(f"mutmut run exited with {result.returncode}: run `mutmut run {' '.join(names)}` to see why")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=CORE, help=f"modules under src/pole_hf (default: {CORE})")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutants (default 1)")
    parser.add_argument("--report", action="store_true", help="only print the table of the last run")
    parser.add_argument("--focus", action="store_true", help="only the FOCUS functions of each module")
    parser.add_argument("--resume", action="store_true", help="only the mutants the last run left unchecked")
    parser.add_argument("--json", help="also write the per-module results to this file")
    args = parser.parse_args()
    unknown = [m for m in args.modules if not (ROOT / "src" / "pole_hf" / f"{m}.py").is_file()]
    if unknown:
        parser.error(f"no module src/pole_hf/<name>.py for {unknown}; core modules: {CORE}")
    if not args.report:  # one mutmut run: one stats pass, one clean-test pass
        names = [p for m in args.modules for p in patterns(m, args.focus)]
        if args.resume:  # mutmut reruns every mutant it is named: name only those without a verdict
            names = [n for m in args.modules if meta_path(m).is_file() for n, code in
                     json.loads(meta_path(m).read_text())["exit_code_by_key"].items()
                     if code is None and any(fnmatch.fnmatchcase(n, p) for p in patterns(m, args.focus))]
        seconds = run_mutmut(names, args.max_children) if names else 0.0
        print(f"mutmut run: {seconds:.0f} s")
    reports = [module_report(m, args.focus) for m in args.modules]
    print("| module | mutants | not run | killed | equivalent | surviving | score |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in reports:
        print(f"| {r['module']} | {r['mutants']} | {r['not_run']} | {r['killed']} | {len(r['equivalent'])} "
              f"| {len(r['surviving'])} | {100 * r['score']:.1f}% |")
    for r in reports:
        for name, code in r["surviving"].items():
            print(f"surviving ({'no tests' if code == 33 else code}): {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
