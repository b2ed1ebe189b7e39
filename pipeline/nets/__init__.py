"""Neural networks trained on images: fine-tuning the backbone (cached frozen prefix) and the from-scratch baseline."""
