## make_glmm_refs.R -- extra GLMM reference values for stochmm (issue 3: GLMMs, deterministic path).
##
## Usage:  Rscript models/reference/make_glmm_refs.R [OUTFILE]
##         (default OUTFILE = tests/reference/lme4_glmm_extra.json)
##
## Produces one JSON file with
##   * lme4 1.1-31 glmer fits with a tight PIRLS tolerance (glmerControl(tolPwrss = 1e-12)):
##     lme4's default tolPwrss = 1e-7 leaves its Laplace deviance up to ~6e-4 above the exact
##     Laplace value and, through the finite-difference Hessian, its nAGQ = 1 standard errors up
##     to ~1.3 % off; with 1e-12 lme4 reproduces the exact-Laplace optimum and SEs (and glmmTMB).
##     For probit/cloglog lme4's Laplace uses expected (Fisher) weights: compare with
##     stochmm's hessian = "expected".
##   * glmmTMB 1.1.5 fits (exact, observed-Hessian Laplace) for the probit and cloglog links.
##   * the simulated binary longitudinal data of GLMMadaptive's vignette "Methods for MixMod
##     Objects" (set.seed(1234); regenerated here, identical in every R >= 3.0 since it uses
##     runif/rnorm/rbinom only), the output GLMMadaptive 0.5.26 published for
##     mixed_model(y ~ sex * time, random = ~ time | id, family = binomial()) with 11 adaptive
##     quadrature points per dimension, lme4/glmmTMB Laplace fits of y ~ sex * time + (time | id),
##     and an independent (plain R) 2-D adaptive Gauss-Hermite evaluation of the marginal
##     -2 log-likelihood at fixed parameters for several numbers of nodes.
## Numbers are written with the shortest decimal string that round-trips (full precision).

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(jsonlite)
  library(statmod)
})
stopifnot(packageVersion("lme4") == "1.1.31")
args <- commandArgs(trailingOnly = TRUE)
OUT <- if (length(args) >= 1) args[1] else "tests/reference/lme4_glmm_extra.json"

num2str <- function(x) {
  if (is.na(x) || !is.finite(x)) return("null")
  for (d in 15:17) { s <- sprintf(paste0("%.", d, "g"), x); if (as.numeric(s) == x) break }
  s
}
scalar2json <- function(x) {
  if (is.na(x)) return("null")
  if (is.logical(x)) return(if (x) "true" else "false")
  if (is.integer(x)) return(as.character(x))
  if (is.numeric(x)) return(num2str(x))
  if (is.factor(x)) x <- as.character(x)
  as.character(jsonlite::toJSON(as.character(x), auto_unbox = TRUE))
}
toj <- function(x, ind = 0) {
  pad <- strrep(" ", ind + 1); pad0 <- strrep(" ", ind)
  if (is.null(x)) return("null")
  if (is.list(x) && !is.data.frame(x)) {
    if (length(x) == 0) return(if (!is.null(names(x))) "{}" else "[]")
    if (!is.null(names(x))) {
      items <- vapply(seq_along(x), function(i) paste0(pad, scalar2json(names(x)[i]), ": ", toj(x[[i]], ind + 1)), "")
      return(paste0("{\n", paste(items, collapse = ",\n"), "\n", pad0, "}"))
    }
    items <- vapply(x, function(e) paste0(pad, toj(e, ind + 1)), "")
    return(paste0("[\n", paste(items, collapse = ",\n"), "\n", pad0, "]"))
  }
  asis <- inherits(x, "AsIs"); x <- unclass(x)
  if (is.factor(x)) x <- as.character(x)
  if (length(x) == 1 && !asis) return(scalar2json(x))
  if (length(x) == 0) return("[]")
  paste0("[", paste(vapply(seq_along(x), function(i) scalar2json(x[[i]]), ""), collapse = ", "), "]")
}
named <- function(v) { l <- as.list(unname(v)); names(l) <- names(v); l }

tight <- glmerControl(tolPwrss = 1e-12)
lme4_entry <- function(fit, call) {
  V <- as.matrix(vcov(fit))
  list(call = call, package = "lme4 1.1-31", control = "glmerControl(tolPwrss = 1e-12)",
       minus2logLik = -2 * c(logLik(fit)), fixef = named(fixef(fit)), se = named(sqrt(diag(V))),
       theta = named(getME(fit, "theta")), feval = fit@optinfo$feval,
       conv_messages = I(as.character(fit@optinfo$conv$lme4$messages)),
       ranef = ranef_json(fit))
}
ranef_json <- function(fit) {
  re <- ranef(fit, condVar = TRUE)
  out <- lapply(names(re), function(g) {
    d <- re[[g]]; pv <- attr(d, "postVar")
    terms <- lapply(d, function(col) I(col))
    condsd <- lapply(seq_along(d), function(j) I(sqrt(pv[j, j, ])))
    names(condsd) <- names(d)
    list(levels = I(rownames(d)), terms = terms, condsd = condsd)
  })
  names(out) <- names(re)
  out
}
tmb_entry <- function(fit, call) {
  V <- vcov(fit)$cond
  vc <- VarCorr(fit)$cond[[1]]
  list(call = call, package = "glmmTMB 1.1.5", minus2logLik = -2 * c(logLik(fit)),
       fixef = named(fixef(fit)$cond), se = named(sqrt(diag(V))),
       sd = I(unname(attr(vc, "stddev"))), corr = I(unname(attr(vc, "correlation")[lower.tri(attr(vc, "correlation"))])))
}

data("cbpp", "VerbAgg", package = "lme4")
E <- list()
f <- "cbind(incidence, size - incidence) ~ period + (1 | herd)"
E$cbpp_agq1_tight <- lme4_entry(glmer(as.formula(f), cbpp, binomial, control = tight),
                                paste0("glmer(", f, ", cbpp, binomial, control = glmerControl(tolPwrss = 1e-12))"))
fp <- "incidence ~ period + offset(log(size)) + (1 | herd)"
E$cbpp_pois_agq1_tight <- lme4_entry(glmer(as.formula(fp), cbpp, poisson, control = tight),
                                     paste0("glmer(", fp, ", cbpp, poisson, control = glmerControl(tolPwrss = 1e-12))"))
for (lk in c("probit", "cloglog")) {
  E[[paste0("cbpp_", lk, "_agq1_tight")]] <- lme4_entry(
    glmer(as.formula(f), cbpp, binomial(link = lk), control = tight),
    paste0("glmer(", f, ", cbpp, binomial(link = '", lk, "'), control = glmerControl(tolPwrss = 1e-12))"))
  E[[paste0("tmb_cbpp_", lk)]] <- tmb_entry(glmmTMB(as.formula(f), cbpp, binomial(link = lk)),
                                            paste0("glmmTMB(", f, ", cbpp, binomial(link = '", lk, "'))"))
}
fv <- "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"
E$verbagg_agq1_tight <- lme4_entry(glmer(as.formula(fv), VerbAgg, binomial, control = tight),
                                   paste0("glmer(", fv, ", VerbAgg, binomial, control = glmerControl(tolPwrss = 1e-12))"))

## ---- GLMMadaptive vignette data (Methods for MixMod Objects) -------------------------------
set.seed(1234)
n <- 100; K <- 8; t_max <- 15
DF <- data.frame(id = rep(seq_len(n), each = K),
                 time = c(replicate(n, c(0, sort(runif(K - 1, 0, t_max))))),
                 sex = rep(gl(2, n / 2, labels = c("male", "female")), each = K))
X <- model.matrix(~ sex * time, data = DF)
Z <- model.matrix(~ time, data = DF)
betas <- c(-2.13, -0.25, 0.24, -0.05)
D11 <- 0.48; D22 <- 0.1
b <- cbind(rnorm(n, sd = sqrt(D11)), rnorm(n, sd = sqrt(D22)))
eta_y <- as.vector(X %*% betas + rowSums(Z * b[DF$id, ]))
DF$y <- rbinom(n * K, 1, plogis(eta_y))
DF$id <- factor(DF$id)

fg <- "y ~ sex * time + (time | id)"
lfit <- glmer(as.formula(fg), DF, binomial, control = tight)
tfit <- glmmTMB(as.formula(fg), DF, binomial)

## independent 2-D adaptive Gauss-Hermite marginal -2 log L at fixed (beta, D):
## per id: mode and Hessian of log p(y|b) + log N(b; 0, D) by Newton, nodes b = mode + L^{-T} z
## (L L' = Hessian), probabilists' GH rule (statmod::gauss.quad.prob), tensor product.
agq2 <- function(beta, D, nq) {
  gq <- gauss.quad.prob(nq, dist = "normal")
  zz <- as.matrix(expand.grid(gq$nodes, gq$nodes)); ww <- apply(as.matrix(expand.grid(gq$weights, gq$weights)), 1, prod)
  Di <- solve(D); ldD <- as.numeric(determinant(D)$modulus)
  tot <- 0
  for (i in levels(DF$id)) {
    r <- DF$id == i
    Xi <- X[r, , drop = FALSE]; Zi <- Z[r, , drop = FALSE]; yi <- DF$y[r]
    e0 <- as.vector(Xi %*% beta)
    h <- function(bb) { eta <- e0 + as.vector(Zi %*% bb)
      sum(yi * eta - log1p(exp(eta))) - 0.5 * sum(bb * (Di %*% bb)) - 0.5 * ldD - log(2 * pi) }
    bb <- c(0, 0)
    for (it in 1:100) {
      p <- plogis(e0 + as.vector(Zi %*% bb))
      g <- as.vector(crossprod(Zi, yi - p)) - as.vector(Di %*% bb)
      H <- crossprod(Zi, Zi * (p * (1 - p))) + Di
      step <- solve(H, g); bb <- bb + step
      if (max(abs(step)) < 1e-13) break
    }
    p <- plogis(e0 + as.vector(Zi %*% bb))
    H <- crossprod(Zi, Zi * (p * (1 - p))) + Di
    L <- t(chol(H))
    R <- solve(t(L))
    vals <- apply(zz, 1, function(z) h(bb + as.vector(R %*% z)) + 0.5 * sum(z^2)) + log(ww)
    m <- max(vals)
    tot <- tot + m + log(sum(exp(vals - m))) + log(2 * pi) - sum(log(diag(L)))
  }
  -2 * tot
}
tb <- fixef(tfit)$cond
tsd <- attr(VarCorr(tfit)$cond$id, "stddev"); tcor <- attr(VarCorr(tfit)$cond$id, "correlation")[2, 1]
Dt <- diag(tsd) %*% matrix(c(1, tcor, tcor, 1), 2) %*% diag(tsd)
agq_at <- lapply(c(1, 5, 11, 25), function(nq) list(nodes_per_dim = nq, minus2logLik = agq2(tb, Dt, nq)))
## ... and at GLMMadaptive's published (rounded) estimates, a well-conditioned D
gb <- c(-2.057131526, -1.169617288, 0.261562222, 0.001962038)
gsd <- c(0.6808, 0.2510); gcor <- 0.6544
Dg <- diag(gsd) %*% matrix(c(1, gcor, gcor, 1), 2) %*% diag(gsd)
agq_g <- lapply(c(1, 5, 11, 25, 40), function(nq) list(nodes_per_dim = nq, minus2logLik = agq2(gb, Dg, nq)))

E$glmmadaptive_slopes <- list(
  description = paste("Binary longitudinal data simulated as in GLMMadaptive's vignette 'Methods for MixMod",
                      "Objects' (set.seed(1234); 100 ids x 8 visits); model y ~ sex * time, random = ~ time | id."),
  data = list(id = I(as.integer(DF$id)), time = I(DF$time), sex = I(as.character(DF$sex)), y = I(DF$y)),
  glmmadaptive_published = list(
    source = "https://github.com/drizopoulos/GLMMadaptive docs/articles/Methods_MixMod.html (GLMMadaptive 0.5.26, built 2019-04-06)",
    call = "mixed_model(fixed = y ~ sex * time, random = ~ time | id, data = DF, family = binomial())",
    nAGQ = 11, logLik = -358.8142, AIC = 731.6283, BIC = 749.8645,
    fixef = list("(Intercept)" = -2.057131526, sexfemale = -1.169617288, time = 0.261562222,
                 "sexfemale:time" = 0.001962038),
    se = list("(Intercept)" = 0.3148, sexfemale = 0.4683, time = 0.0563, "sexfemale:time" = 0.0783),
    sd = I(c(0.6808, 0.2510)), corr = 0.6544,
    note = "GLMMadaptive re-centres the quadrature only every few EM/quasi-Newton iterations (update_GH_every), so its optimum is the 11-point AGQ MLE to about 3-4 digits"),
  lme4_laplace = lme4_entry(lfit, paste0("glmer(", fg, ", DF, binomial, control = glmerControl(tolPwrss = 1e-12))")),
  tmb_laplace = tmb_entry(tfit, paste0("glmmTMB(", fg, ", DF, binomial)")),
  independent_agq_at_tmb_estimates = list(
    note = "plain-R 2-D adaptive GH (mode + Cholesky scaling, tensor product) at glmmTMB's estimates; nodes_per_dim = 1 is the exact Laplace value",
    beta = I(unname(tb)), sd = I(unname(tsd)), corr = tcor, values = agq_at),
  independent_agq_at_glmmadaptive_estimates = list(
    note = "the same plain-R 2-D adaptive GH at GLMMadaptive's published (rounded) estimates",
    beta = I(gb), sd = I(gsd), corr = gcor, values = agq_g)
)

E$meta <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
               glmmTMB = as.character(packageVersion("glmmTMB")), statmod = as.character(packageVersion("statmod")),
               script = "models/reference/make_glmm_refs.R")
writeLines(toj(E), OUT)
invisible(jsonlite::fromJSON(OUT))
cat("wrote", OUT, "\n")
