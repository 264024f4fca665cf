# Wald SE of a random-effect SD for tests/stochastic/test_accuracy.py (issue 10):
# glmmTMB 1.1.5 (exact Laplace, observed Hessian) on cbpp; glmmTMB estimates log(SD) and its SE,
# so SE(SD) = SD * SE(log SD) (delta method). Pinned in test_wald_se_of_the_sd_matches_glmmTMB.
# Run: Rscript models/reference/accuracy_wald_se_glmmTMB.R
suppressPackageStartupMessages({library(glmmTMB); library(lme4)})
data(cbpp)
f <- glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, family = binomial)
sd <- exp(f$fit$par[["theta"]])
V <- vcov(f, full = TRUE)
se_log <- sqrt(V[nrow(V), ncol(V)])
cat(sprintf("sd=%.10f se_logsd=%.10f se_sd=%.10f\n", sd, se_log, sd * se_log))
cat("se_beta=", sprintf("%.10f", sqrt(diag(V))[1:4]), "\n")
