#!/usr/bin/env bash
# The whole featx workflow, offline, on a real dataset with real ImageNet weights:
# Fashion-MNIST (or scikit-learn digits) as an image folder -> EfficientNet-Lite0 features in an
# HDF5 store -> a sweep of classifiers on the cached features -> test-set evaluation.
# Needs `featx` on PATH (see the README's quick start).
set -euo pipefail
cd "$(dirname "$0")/.."

python examples/make_dataset.py data/fashion --train-per-class 100 --per-class 30

# One pass over the images stores two layers (pooled to vectors).
featx extract data/fashion --backbone efficientnet_lite0 \
    --layer forward_features --layer blocks.5 --pool avg \
    --store stores/fashion-lite0.h5
# Running it again reuses the store: nothing is computed.
featx extract data/fashion --backbone efficientnet_lite0 \
    --layer forward_features --pool avg --store stores/fashion-lite0.h5
featx info stores/fashion-lite0.h5

# Many experiments, one extraction: every classifier on every layer, ranked on validation.
featx fit --store stores/fashion-lite0.h5 \
    --layer forward_features@avg --layer blocks.5@avg \
    --clf logreg --clf linearsvm --clf knn --clf mlp \
    --model stores/fashion-lite0-best.featx --report stores/fashion-lite0-report.json
featx evaluate --model stores/fashion-lite0-best.featx --store stores/fashion-lite0.h5 --split test
# Every fit and evaluate above is in the store's experiment log.
featx runs --store stores/fashion-lite0.h5
featx report stores/fashion-lite0-report.html --store stores/fashion-lite0.h5
