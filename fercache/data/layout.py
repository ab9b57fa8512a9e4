"""Names and sizes in an Aff-Wild2 tree that more than one part of fercache needs.

The annotation folders are named as in the 6th ABAW release (the reader in `affwild2` accepts
every edition's names; the synthetic tree writes these). `pools/` is not part of Aff-Wild2: it
holds the still images of the semi-supervised phase next to a synthetic tree, `labelled.csv`
(`path,label` rows) and `landmarks.csv` (the labelled images' 68 landmarks, read by landmark
pretraining).
"""

IMAGE_SIZE = 112  # cropped_aligned frames are 112 x 112 pixels
LANDMARKS = 68  # facial landmarks per face, in the iBUG 300-W layout
ANNOTATION_FOLDERS = {
    "expr": "EXPR_Recognition_Challenge",
    "au": "AU_Detection_Challenge",
    "va": "VA_Estimation_Challenge",
}
SPLIT_FOLDERS = {"train": "Train_Set", "val": "Validation_Set"}
POOLS_DIRNAME = "pools"
LABELLED_CSV = "labelled.csv"  # in pools/: path,label per labelled still image
LANDMARKS_CSV = "landmarks.csv"  # in pools/: path,x0,y0,...,x67,y67 per labelled still image
