"""posttrain: the LLM post-training recipe as DVC stages (see dvc.yaml), with the pieces the stages share."""
