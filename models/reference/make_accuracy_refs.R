# Reference Monte Carlo study for tests/stochastic/test_accuracy.py (issue 10, section 2):
# binary responses, 100 clusters of size 2, logit P(y = 1) = -1 + 0.5 x + b_g, x ~ N(0, 1),
# b_g ~ N(0, 2^2). The design (x, g) is drawn once and kept fixed, as in the study;
# only b and y are redrawn. Fitted by lme4's Laplace (nAGQ = 1) and AGQ (nAGQ = 9).
# Output: tests/reference/lme4_accuracy_small_clusters.json with the bias of the random-intercept
# SD, its Monte Carlo SE, the per-method singular and failure counts, and the design's x
# (the tests run the same study on the same design).
# R's RNG is independent of numpy's, so these are an independent Monte Carlo estimate.
# Run: Rscript models/reference/make_accuracy_refs.R   (about 3 minutes on one core)
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
set.seed(20261202)
nsim <- 2000
ng <- 100; m <- 2
d <- data.frame(g = factor(rep(seq_len(ng), each = m)), x = rnorm(ng * m))
beta <- c(-1, 0.5); sd_true <- 2
X <- model.matrix(~ x, d)
res <- list()
for (nagq in c(1, 9)) {
  set.seed(7)
  est <- rep(NA_real_, nsim); sing <- 0L; fail <- 0L
  for (i in seq_len(nsim)) {
    b <- rnorm(ng, 0, sd_true)
    eta <- drop(X %*% beta) + b[as.integer(d$g)]
    d$y <- rbinom(nrow(d), 1, plogis(eta))
    f <- tryCatch(suppressWarnings(suppressMessages(glmer(y ~ x + (1 | g), d, family = binomial, nAGQ = nagq))),
                  error = function(e) NULL)
    if (is.null(f)) { fail <- fail + 1L; next }
    est[i] <- getME(f, "theta")[[1]]
    if (isSingular(f)) sing <- sing + 1L
  }
  ok <- est[!is.na(est)]
  res[[if (nagq == 1) "laplace" else "agq:9"]] <- list(
    nsim = nsim, n_ok = length(ok), bias = mean(ok) - sd_true, mcse = sd(ok) / sqrt(length(ok)),
    singular = sing, failed = fail)
}
out <- list(scenario = "binary, 100 clusters of size 2, beta = (-1, 0.5), x ~ N(0,1), sd(g) = 2",
            design_x = d$x,
            parameter = "sd(g)", truth = sd_true, lme4 = as.character(packageVersion("lme4")),
            R = R.version.string, results = res)
write_json(out, "tests/reference/lme4_accuracy_small_clusters.json", auto_unbox = TRUE, digits = 10, pretty = TRUE)
print(res)
