"""Small pure tensor functions that methods compose (in the spirit of PEFT's ``merge_utils``)."""
