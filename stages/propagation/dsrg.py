"""DSRG (Huang et al., CVPR 2018, ``speedinghzl/DSRG``): seeds grown by region growing after a CRF while a
segmentation net trains (TrainSeedNet, stages/seed_net/growing.py); its predictions are the pseudo labels.

Its final CRF is DGCN's test CRF: our DSRG runs in DGCN's code base, as DGCN's own DSRG baseline does (the Caffe
original ends with the network's prediction)."""

from stages.propagation.method import SEED_NET, PropagationMethod
from stages.propagation.seed_net import predicted_scores

METHOD = PropagationMethod(name="dsrg", run=predicted_scores, trained_by=SEED_NET, final_crf="dgcn_test",
                           reference="DSRG, Huang et al. CVPR 2018 (speedinghzl/DSRG)")
