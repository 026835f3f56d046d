"""DGCN (Ouyang et al., 2021, ``hustvl/DGCN``): per-class s-t cuts on a k-NN feature graph regrow the seeds while
a segmentation net trains (TrainSeedNet, stages/seed_net/graphcut.py); its predictions are the pseudo labels."""

from stages.propagation.method import SEED_NET, PropagationMethod
from stages.propagation.seed_net import predicted_scores

METHOD = PropagationMethod(name="graphcut", run=predicted_scores, trained_by=SEED_NET, final_crf="dgcn_test",
                           reference="DGCN (hustvl/DGCN): graph cuts on a kNN graph during training")
