## make_extra_refs.R -- extra lme4 1.1-31 / glmmTMB 1.1.5 reference values for stochmm.
##
## Usage:  Rscript make_extra_refs.R [OUTDIR]      (default OUTDIR = /work/ref_extra)
##
## Produces
##   OUTDIR/lme4_extra_results.json        (same schema as shared/reference/lme4_results.json)
##   OUTDIR/lme4_extra_devfun_points.json  (same schema as shared/reference/lme4_devfun_points.json)
##   OUTDIR/datasets/{Pastes,Penicillin,Oats}.csv, levels.json, ordered_factors.json
##   OUTDIR/versions.json
##
## Numbers are written with the shortest decimal string that round-trips to the same
## IEEE double (15, 16 or 17 significant digits), i.e. full precision (jsonlite caps at 15).

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(jsonlite)
})
stopifnot(requireNamespace("lmerTest"), requireNamespace("pbkrtest"), requireNamespace("nlme"))

args <- commandArgs(trailingOnly = TRUE)
OUT <- if (length(args) >= 1) args[1] else "/work/ref_extra"
dir.create(file.path(OUT, "datasets"), recursive = TRUE, showWarnings = FALSE)
set.seed(1)

stopifnot(packageVersion("lme4") == "1.1.31")

## ---------------------------------------------------------------------------
## full-precision JSON writer
## ---------------------------------------------------------------------------
num2str <- function(x) {
  if (is.na(x) || !is.finite(x)) return("null")
  for (d in 15:17) {
    s <- sprintf(paste0("%.", d, "g"), x)
    if (as.numeric(s) == x) break
  }
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
## lists with names -> object, unnamed lists -> array; atomic length 1 -> scalar unless
## wrapped in I() (class AsIs) -> array; atomic length != 1 -> array.
toj <- function(x, ind = 0) {
  pad <- strrep(" ", ind + 1); pad0 <- strrep(" ", ind)
  if (is.null(x)) return("null")
  if (is.list(x) && !is.data.frame(x)) {
    if (length(x) == 0) return(if (!is.null(names(x))) "{}" else "[]")
    if (!is.null(names(x))) {
      items <- vapply(seq_along(x), function(i)
        paste0(pad, scalar2json(names(x)[i]), ": ", toj(x[[i]], ind + 1)), "")
      return(paste0("{\n", paste(items, collapse = ",\n"), "\n", pad0, "}"))
    } else {
      items <- vapply(x, function(e) paste0(pad, toj(e, ind + 1)), "")
      return(paste0("[\n", paste(items, collapse = ",\n"), "\n", pad0, "]"))
    }
  }
  asis <- inherits(x, "AsIs")
  x <- unclass(x)
  if (is.factor(x)) x <- as.character(x)
  if (length(x) == 1 && !asis) return(scalar2json(x))
  if (length(x) == 0) return("[]")
  items <- vapply(seq_along(x), function(i) paste0(pad, scalar2json(x[[i]])), "")
  paste0("[\n", paste(items, collapse = ",\n"), "\n", pad0, "]")
}
write_json_full <- function(x, file) {
  writeLines(toj(x), file)
  invisible(jsonlite::fromJSON(file, simplifyVector = FALSE))  # validate
}
named_list <- function(v) { l <- as.list(unname(v)); names(l) <- names(v); l }
mat_json <- function(M) list(names = I(colnames(M)),
                             matrix = lapply(seq_len(nrow(M)), function(i) I(unname(M[i, ]))))
na2null <- function(l) lapply(l, function(v) if (length(v) == 1 && is.na(v)) NULL else v)

## ---------------------------------------------------------------------------
## data
## ---------------------------------------------------------------------------
data("Pastes", "Penicillin", "sleepstudy", "cbpp", package = "lme4")
Oats0 <- nlme::Oats
Oats <- data.frame(Block = Oats0$Block,          # ordered factor VI<V<III<IV<II<I (as nlme)
                   Variety = Oats0$Variety,
                   nitro = Oats0$nitro,
                   yield = Oats0$yield)
Oats$nf <- factor(Oats$nitro)
rownames(Oats) <- NULL

write.csv(Pastes, file.path(OUT, "datasets", "Pastes.csv"), row.names = FALSE, quote = FALSE)
write.csv(Penicillin, file.path(OUT, "datasets", "Penicillin.csv"), row.names = FALSE, quote = FALSE)
write.csv(Oats, file.path(OUT, "datasets", "Oats.csv"), row.names = FALSE, quote = FALSE)
lev_of <- function(d) { f <- Filter(is.factor, d); lapply(f, function(z) I(levels(z))) }
write_json_full(list(Pastes = lev_of(Pastes), Penicillin = lev_of(Penicillin), Oats = lev_of(Oats)),
                file.path(OUT, "datasets", "levels.json"))
ord_of <- function(d) I(names(d)[vapply(d, is.ordered, TRUE)])
write_json_full(list(Pastes = ord_of(Pastes), Penicillin = ord_of(Penicillin), Oats = ord_of(Oats)),
                file.path(OUT, "datasets", "ordered_factors.json"))

DATA <- list(Pastes = Pastes, Penicillin = Penicillin, sleepstudy = sleepstudy, cbpp = cbpp,
             Oats = Oats)

## ---------------------------------------------------------------------------
## helpers
## ---------------------------------------------------------------------------
capture <- function(expr) {
  w <- character(); m <- character()
  val <- withCallingHandlers(expr,
    warning = function(c) { w <<- c(w, conditionMessage(c)); invokeRestart("muffleWarning") },
    message = function(c) { m <<- c(m, conditionMessage(c)); invokeRestart("muffleMessage") })
  list(value = val, warnings = w, messages = m)
}

## median elapsed time of n_runs timed runs; each run repeats the fit k times
## (k chosen so a run takes >= ~0.3 s) and reports elapsed / k.
time_fit <- function(f, n_runs = 5, target = 0.3) {
  t0 <- proc.time()[["elapsed"]]; suppressWarnings(suppressMessages(f()))
  first <- proc.time()[["elapsed"]] - t0
  t0 <- proc.time()[["elapsed"]]; suppressWarnings(suppressMessages(f()))
  second <- proc.time()[["elapsed"]] - t0
  k <- max(1L, as.integer(ceiling(target / max(second, 1e-3))))
  runs <- vapply(seq_len(n_runs), function(i) {
    t <- proc.time()[["elapsed"]]
    for (j in seq_len(k)) suppressWarnings(suppressMessages(f()))
    (proc.time()[["elapsed"]] - t) / k
  }, 0)
  list(elapsed_median_s = median(runs), elapsed_runs_s = I(runs),
       elapsed_first_fit_s = first, n_timed_runs = n_runs, fits_per_timed_run = k)
}

ranef_json <- function(fit) {
  re <- ranef(fit, condVar = TRUE)
  out <- list()
  for (g in names(re)) {
    d <- re[[g]]
    pv <- attr(d, "postVar")
    terms <- lapply(d, function(col) I(col)); names(terms) <- names(d)
    condsd <- NULL
    if (!is.null(pv)) {
      condsd <- lapply(seq_along(d), function(j) I(sqrt(pv[j, j, ])))
      names(condsd) <- names(d)
    }
    out[[g]] <- list(levels = I(rownames(d)), terms = terms, condsd = condsd)
  }
  out
}

varcorr_json <- function(fit) {
  vc <- as.data.frame(VarCorr(fit))
  lapply(seq_len(nrow(vc)), function(i) list(
    group = vc$grp[i],
    name1 = if (is.na(vc$var1[i])) NULL else vc$var1[i],
    name2 = if (is.na(vc$var2[i])) NULL else vc$var2[i],
    kind = if (is.na(vc$var2[i])) "var" else "cov",
    vcov = vc$vcov[i], sdcor = vc$sdcor[i]))
}

## ---------------------------------------------------------------------------
## independent marginal likelihood for GLMMs with ONE scalar random intercept
## (b_j ~ N(0, sd^2), sd = theta since sigma = 1 for binomial/poisson):
##   * exact Laplace (observed Hessian at the exact conditional mode),
##   * "Fisher" Laplace (expected information weights, the lme4 formula),
##   * adaptive Gauss-Hermite with nq nodes per group (numint; nq = 50 ~ exact).
## All values are FULL -2 log L, i.e. include log(y!) (Poisson) / log choose(n,y) (binomial).
## ---------------------------------------------------------------------------
cond_ll <- function(kind) switch(kind,
  poisson_log = function(eta, y, n) {
    mu <- exp(eta)
    list(l = y * eta - mu - lgamma(y + 1), d1 = y - mu, d2 = -mu, fisher = mu)
  },
  binomial_logit = function(eta, y, n) {
    p <- plogis(eta)
    list(l = lchoose(n, y) + y * plogis(eta, log.p = TRUE) +
           (n - y) * plogis(eta, lower.tail = FALSE, log.p = TRUE),
         d1 = y - n * p, d2 = -n * p * (1 - p), fisher = n * p * (1 - p))
  },
  binomial_probit = function(eta, y, n) {
    p <- pnorm(eta); q <- pnorm(eta, lower.tail = FALSE)
    dp <- dnorm(eta); d2p <- -eta * dp
    A <- y / p - (n - y) / q; B <- y / p^2 + (n - y) / q^2
    list(l = lchoose(n, y) + y * pnorm(eta, log.p = TRUE) +
           (n - y) * pnorm(eta, lower.tail = FALSE, log.p = TRUE),
         d1 = A * dp, d2 = A * d2p - B * dp^2, fisher = n * dp^2 / (p * q))
  },
  binomial_cloglog = function(eta, y, n) {
    mu <- exp(eta); p <- -expm1(-mu); q <- exp(-mu)
    dp <- exp(eta - mu); d2p <- dp * (1 - mu)
    A <- y / p - (n - y) / q; B <- y / p^2 + (n - y) / q^2
    list(l = lchoose(n, y) + y * log(p) + (n - y) * (-mu),
         d1 = A * dp, d2 = A * d2p - B * dp^2, fisher = n * dp^2 / (p * q))
  })

ghq <- function(nq) {            # probabilists' Gauss-Hermite (standard normal weights)
  r <- lme4::GHrule(nq); list(z = r[, "z"], w = r[, "w"], ldnorm = r[, "ldnorm"])
}

marginal_m2ll <- function(kind, y, n, eta0, grp, sd, nq = 50) {
  f <- cond_ll(kind); gh <- ghq(nq)
  grp <- as.factor(grp)
  lap <- fis <- agq <- 0
  modes <- numeric(nlevels(grp))
  for (jj in seq_along(levels(grp))) {
    i <- which(grp == levels(grp)[jj])
    g <- function(b) { r <- f(eta0[i] + b, y[i], n[i]); sum(r$l) + dnorm(b, 0, sd, log = TRUE) }
    b <- 0
    for (it in 1:200) {
      r <- f(eta0[i] + b, y[i], n[i])
      g1 <- sum(r$d1) - b / sd^2; g2 <- sum(r$d2) - 1 / sd^2
      step <- -g1 / g2
      if (g2 >= 0) step <- sign(g1) * 0.5
      bn <- b + step
      s <- 1; while (g(bn) < g(b) - 1e-12 && s > 1e-8) { s <- s / 2; bn <- b + s * step }
      conv <- abs(bn - b) < 1e-13 * (1 + abs(b))
      b <- bn
      if (conv) break
    }
    r <- f(eta0[i] + b, y[i], n[i])
    H <- -(sum(r$d2) - 1 / sd^2)
    HF <- sum(r$fisher) + 1 / sd^2
    gb <- g(b)
    lap <- lap + (-2) * (gb + 0.5 * log(2 * pi) - 0.5 * log(H))
    fis <- fis + (-2) * (gb + 0.5 * log(2 * pi) - 0.5 * log(HF))
    sc <- 1 / sqrt(H)
    lv <- vapply(seq_along(gh$z), function(k) g(b + sc * gh$z[k]) - gh$ldnorm[k], 0) + log(gh$w)
    mx <- max(lv)
    agq <- agq + (-2) * (mx + log(sum(exp(lv - mx))) + log(sc))
    modes[jj] <- b
  }
  list(laplace_exact_independent = lap, laplace_fisher_independent = fis,
       numint_minus2logLik = agq, numint_nodes_per_group = nq)
}

glmm_kind <- function(fam, link) paste0(fam, "_", link)

## pieces (y, n, eta0 = X beta + offset, grp) for a glmer fit with one grouping factor
glmm_pieces <- function(fit) {
  fr <- model.frame(fit)
  resp <- fit@resp
  wt <- resp$weights          # prior weights (binomial: n)
  yy <- resp$y                # proportion for binomial, counts for poisson
  fam <- family(fit)$family
  if (fam == "binomial") { n <- wt; y <- round(yy * wt) } else { n <- rep(NA_real_, length(yy)); y <- yy }
  off <- resp$offset
  X <- getME(fit, "X")
  grp <- getME(fit, "flist")[[1]]
  list(y = y, n = n, X = X, off = off, grp = grp)
}
saturated_m2ll <- function(fam, y, n) {
  if (fam == "binomial") -2 * sum(dbinom(y, n, y / n, log = TRUE))
  else if (fam == "poisson") -2 * sum(dpois(y, y, log = TRUE))
  else NA_real_
}

## ---------------------------------------------------------------------------
## ddf block for REML lmer fits (lmerTest / pbkrtest), same layout as shared reference
## ---------------------------------------------------------------------------
ddf_block <- function(call_str, data, anova_too = FALSE) {
  lt_call <- sub("^lmer\\(", "lmerTest::lmer(", call_str)
  ltfit <- eval(parse(text = lt_call), envir = list2env(data, parent = globalenv()))
  tab <- function(ddf) {
    cf <- summary(ltfit, ddf = ddf)$coefficients
    out <- lapply(rownames(cf), function(r) list(estimate = cf[r, "Estimate"], se = cf[r, "Std. Error"],
                                                 df = cf[r, "df"], t = cf[r, "t value"], p = cf[r, "Pr(>|t|)"]))
    names(out) <- rownames(cf); out
  }
  fit <- as(ltfit, "lmerMod")
  p <- length(fixef(fit)); nm <- names(fixef(fit))
  dfs <- vapply(seq_len(p), function(j) { L <- matrix(0, 1, p); L[1, j] <- 1
                                          pbkrtest::get_Lb_ddf(fit, L) }, 0)
  Va <- as.matrix(pbkrtest::vcovAdj(fit)); dimnames(Va) <- list(nm, nm)
  res <- list(
    lmerTest_call = lt_call,
    satterthwaite_lmerTest = tab("Satterthwaite"),
    kenward_roger_lmerTest = tab("Kenward-Roger"),
    kenward_roger_pbkrtest = list(
      code = "pbkrtest::get_Lb_ddf(fit, L) with L = unit row vector; SE from sqrt(diag(pbkrtest::vcovAdj(fit)))",
      df = named_list(setNames(dfs, nm)),
      se_adj = named_list(setNames(sqrt(diag(Va)), nm)),
      vcov_adj = mat_json(Va)))
  if (anova_too) {
    an <- function(ddf) {
      a <- anova(ltfit, ddf = ddf, type = 3)
      out <- lapply(rownames(a), function(r) list(SumSq = a[r, "Sum Sq"], MeanSq = a[r, "Mean Sq"],
                                                  NumDF = a[r, "NumDF"], DenDF = a[r, "DenDF"],
                                                  F = a[r, "F value"], p = a[r, "Pr(>F)"]))
      names(out) <- rownames(a); out
    }
    res$anova_type3_satterthwaite_lmerTest <- an("Satterthwaite")
    res$anova_type3_kenward_roger_lmerTest <- an("Kenward-Roger")
  }
  res
}

## ---------------------------------------------------------------------------
## one lme4 entry
## ---------------------------------------------------------------------------
fit_entry <- function(id, dataset, call_str, family = "gaussian", link = "identity",
                      REML = NULL, nAGQ = NULL, extra = list()) {
  cat("fitting", id, "\n")
  env <- list2env(DATA, parent = globalenv())
  expr <- parse(text = call_str)[[1]]
  cap <- capture(eval(expr, envir = env))
  fit <- cap$value
  is_glmm <- isGLMM(fit)
  ll <- logLik(fit)
  cmp <- fit@devcomp$cmp
  fe <- fixef(fit)
  V <- as.matrix(vcov(fit)); dimnames(V) <- list(names(fe), names(fe))
  res <- list()
  if (!is_glmm) {
    reml <- isREML(fit)
    res$objective_kind <- if (reml) "REMLcrit" else "ML deviance"
    res$objective <- if (reml) unname(cmp["REML"]) else unname(cmp["dev"])
    res$deviance <- res$objective
    res$REMLcrit <- if (reml) REMLcrit(fit) else NULL
    res$deviance_ML_at_REML_estimates <- if (reml) deviance(fit, REML = FALSE) else NULL
  } else {
    res$objective_kind <- "-2*logLik (Laplace/AGQ)"
    res$objective <- unname(cmp["dev"])
    res$deviance <- NULL; res$REMLcrit <- NULL; res$deviance_ML_at_REML_estimates <- NULL
  }
  res$minus2logLik <- -2 * c(ll)
  res$deviance_R <- if (is_glmm) deviance(fit) else NULL
  res$logLik <- c(ll)
  res$logLik_df <- attr(ll, "df")
  res$AIC <- AIC(fit); res$BIC <- BIC(fit)
  res$fixef <- named_list(fe)
  res$se <- named_list(sqrt(diag(V)))
  res$vcov <- mat_json(V)
  if (is_glmm) {
    VR <- as.matrix(suppressWarnings(vcov(fit, use.hessian = FALSE)))
    res$se_RX <- named_list(setNames(sqrt(diag(VR)), names(fe)))
    res$vcov_source <- if (!is.null(fit@optinfo$derivs$Hessian) && nAGQ > 0)
      "finite-difference Hessian (lme4 default for GLMM)" else "RX (Cholesky of fixed-effects block)"
  } else {
    res$se_RX <- NULL
    res$vcov_source <- "RX (Cholesky of fixed-effects block)"
  }
  res$theta <- named_list(getME(fit, "theta"))
  res$sigma <- sigma(fit)
  res$varcorr <- varcorr_json(fit)
  res$nobs <- nobs(fit)
  res$ngrps <- as.list(ngrps(fit))
  res$isSingular <- isSingular(fit)
  res$devcomp_cmp <- na2null(as.list(cmp))
  res$devcomp_dims <- as.list(fit@devcomp$dims)
  res$optimizer <- I(fit@optinfo$optimizer)
  res$feval <- fit@optinfo$feval
  res$conv_code <- fit@optinfo$conv$opt
  res$conv_messages_lme4 <- I(as.character(fit@optinfo$conv$lme4$messages))
  res$ranef <- ranef_json(fit)
  if (is_glmm) {
    pc <- glmm_pieces(fit)
    fam <- family(fit)$family; lnk <- family(fit)$link
    sat <- saturated_m2ll(fam, pc$y, pc$n)
    res$saturated_minus2logLik <- sat
    if (nAGQ > 1) {
      res$minus2logLik_abs <- res$minus2logLik + sat
      res$minus2logLik_abs_note <- "lme4 1.1-31 nAGQ>1 logLik/AIC/BIC omit the saturated-model term; absolute -2logL = minus2logLik + saturated_minus2logLik"
    } else {
      res$minus2logLik_abs <- res$minus2logLik
      res$minus2logLik_abs_note <- "lme4 value is already absolute (-2 log L incl. constants)"
    }
    eta0 <- as.vector(pc$X %*% fe) + pc$off
    res$independent_at_estimates <- marginal_m2ll(glmm_kind(fam, lnk), pc$y, pc$n, eta0, pc$grp,
                                                  sd = getME(fit, "theta")[[1]], nq = 50)
  }
  tf <- time_fit(function() eval(expr, envir = env))
  res <- c(res, tf)
  res$warnings <- I(cap$warnings); res$messages <- I(cap$messages)
  entry <- list(id = id, dataset = dataset, call = call_str, package = "lme4",
                family = family, link = link, REML = REML, nAGQ = nAGQ, results = res)
  entry <- c(entry, extra)
  list(entry = entry, fit = fit)
}

## ---------------------------------------------------------------------------
## fits
## ---------------------------------------------------------------------------
E <- list(); FITS <- list()
add <- function(x) { E[[length(E) + 1]] <<- x$entry; FITS[[x$entry$id]] <<- x$fit; invisible(x$fit) }

## (a) Pastes nested
add(fit_entry("pastes_nested_ML", "Pastes",
  "lmer(strength ~ 1 + (1 | batch/cask), data = Pastes, REML = FALSE)", REML = FALSE))
add(fit_entry("pastes_nested_REML", "Pastes",
  "lmer(strength ~ 1 + (1 | batch/cask), data = Pastes, REML = TRUE)", REML = TRUE))
## (b) Penicillin crossed
add(fit_entry("penicillin_crossed_ML", "Penicillin",
  "lmer(diameter ~ 1 + (1 | plate) + (1 | sample), data = Penicillin, REML = FALSE)", REML = FALSE))
add(fit_entry("penicillin_crossed_REML", "Penicillin",
  "lmer(diameter ~ 1 + (1 | plate) + (1 | sample), data = Penicillin, REML = TRUE)", REML = TRUE))
## (c) sleepstudy random intercept REML
add(fit_entry("sleepstudy_intercept_REML", "sleepstudy",
  "lmer(Reaction ~ Days + (1 | Subject), data = sleepstudy, REML = TRUE)", REML = TRUE))
## (d) Oats split plot
oats <- fit_entry("oats_splitplot_REML", "Oats",
  "lmer(yield ~ nf * Variety + (1 | Block/Variety), data = Oats, REML = TRUE)", REML = TRUE)
av <- summary(aov(yield ~ nf * Variety + Error(Block / Variety), data = Oats))
aov_rows <- list()
for (s in names(av)) {
  tb <- av[[s]][[1]]
  for (r in rownames(tb)) aov_rows[[length(aov_rows) + 1]] <- list(
    stratum = sub("^Error: ", "", s), source = trimws(r), Df = tb[r, "Df"],
    SumSq = tb[r, "Sum Sq"], MeanSq = tb[r, "Mean Sq"],
    F = if ("F value" %in% names(tb)) tb[r, "F value"] else NULL,
    p = if ("Pr(>F)" %in% names(tb)) tb[r, "Pr(>F)"] else NULL)
}
oats$entry$aov <- list(
  call = "summary(aov(yield ~ nf * Variety + Error(Block/Variety), data = Oats))",
  table = aov_rows)
oats$entry$data_note <- "Oats = nlme::Oats as plain data.frame(Block, Variety, nitro, yield) plus nf = factor(nitro); Block is an ordered factor in nlme (levels VI<V<III<IV<II<I), kept as is (irrelevant for a grouping factor)"
add(oats)

## (e) cbpp Poisson with offset
pois_note <- paste(
  "lme4 1.1-31 Poisson glmer: for nAGQ = 0 and 1 the objective/logLik/AIC/BIC are the FULL -2 log L:",
  "the Laplace deviance is family$aic() (= -2*sum(dpois(y, mu, log=TRUE)), which INCLUDES -log(y!))",
  "+ ||u||^2 + ldL2. For nAGQ > 1 lme4 uses sum of deviance residuals instead, i.e. it OMITS the",
  "saturated-model term -2*sum(dpois(y, y, log=TRUE)) (which contains the log(y!) constants);",
  "the full value is minus2logLik_abs = minus2logLik + saturated_minus2logLik. glmmTMB's logLik",
  "includes the log(y!) constants. Checked numerically: see independent_at_estimates",
  "(laplace_exact_independent, numint_minus2logLik: 50-node adaptive GH per herd, full constants).")
for (q in c(0, 1, 25)) {
  x <- fit_entry(paste0("cbpp_pois_agq", q), "cbpp",
    sprintf("glmer(incidence ~ period + offset(log(size)) + (1 | herd), data = cbpp, family = poisson, nAGQ = %d)", q),
    family = "poisson", link = "log", REML = NULL, nAGQ = q)
  y <- cbpp$incidence
  x$entry$results$sum_lgamma_y_plus_1 <- sum(lgamma(y + 1))
  if (q <= 1) {
    cmpq <- x$fit@devcomp$cmp
    aicq <- -2 * sum(dpois(y, fitted(x$fit), log = TRUE))   # = poisson()$aic(): includes log(y!)
    x$entry$results$lme4_laplace_decomposition <- list(
      formula = "objective = -2*sum(dpois(y, fitted(fit), log=TRUE)) + ussq + ldL2",
      minus2_sum_dpois_incl_lgamma = aicq, ussq = unname(cmpq["ussq"]), ldL2 = unname(cmpq["ldL2"]),
      sum = aicq + unname(cmpq["ussq"]) + unname(cmpq["ldL2"]), objective = unname(cmpq["dev"]))
  }
  x$entry$notes <- list(logLik_constants = pois_note,
    constant_2_sum_lgamma_y_plus_1 = 2 * sum(lgamma(y + 1)))
  add(x)
}
## (f) cbpp binomial probit / cloglog
for (lk in c("probit", "cloglog")) {
  x <- fit_entry(paste0("cbpp_", lk, "_agq1"), "cbpp",
    sprintf("glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), data = cbpp, family = binomial(link = \"%s\"), nAGQ = 1)", lk),
    family = "binomial", link = lk, REML = NULL, nAGQ = 1)
  x$entry$notes <- list(laplace = paste(
    "non-canonical link: lme4's Laplace uses PIRLS (expected/Fisher information) weights in ldL2, so its",
    "objective matches laplace_fisher_independent (expected-information Laplace), not",
    "laplace_exact_independent (observed-Hessian Laplace, as in glmmTMB/TMB)."))
  add(x)
}
## (g) cbpp binomial as proportions with weights
x <- fit_entry("cbpp_binom_weights_agq1", "cbpp",
  "glmer(incidence/size ~ period + (1 | herd), data = cbpp, weights = size, family = binomial, nAGQ = 1)",
  family = "binomial", link = "logit", REML = NULL, nAGQ = 1)
ref <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), data = cbpp,
             family = binomial, nAGQ = 1)
x$entry$comparison_with_cbind_fit <- list(
  cbind_call = "glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), data = cbpp, family = binomial, nAGQ = 1)",
  cbind_objective = unname(ref@devcomp$cmp["dev"]),
  objective_diff = unname(x$fit@devcomp$cmp["dev"] - ref@devcomp$cmp["dev"]),
  max_abs_fixef_diff = max(abs(fixef(x$fit) - fixef(ref))),
  theta_diff = unname(getME(x$fit, "theta") - getME(ref, "theta")),
  identical_objective = identical(unname(x$fit@devcomp$cmp["dev"]), unname(ref@devcomp$cmp["dev"])))
add(x)

## (e') glmmTMB Poisson
tmb_entry <- function(id, dataset, call_str, family, link) {
  cat("fitting", id, "\n")
  env <- list2env(DATA, parent = globalenv())
  expr <- parse(text = call_str)[[1]]
  cap <- capture(eval(expr, envir = env))
  fit <- cap$value
  ll <- logLik(fit)
  fe <- fixef(fit)$cond
  V <- as.matrix(vcov(fit)$cond); dimnames(V) <- list(names(fe), names(fe))
  par <- fit$fit$par; names(par) <- make.unique(names(par))
  vc <- VarCorr(fit)$cond
  vcj <- list()
  for (g in names(vc)) {
    m <- vc[[g]]; sds <- attr(m, "stddev"); cr <- attr(m, "correlation")
    nm <- colnames(m)
    for (i in seq_along(nm)) vcj[[length(vcj) + 1]] <- list(group = g, name1 = nm[i], name2 = NULL,
      kind = "var", vcov = m[i, i], sdcor = unname(sds[i]))
    if (length(nm) > 1) for (i in 1:(length(nm) - 1)) for (j in (i + 1):length(nm))
      vcj[[length(vcj) + 1]] <- list(group = g, name1 = nm[i], name2 = nm[j], kind = "cov",
                                     vcov = m[i, j], sdcor = cr[i, j])
  }
  re <- ranef(fit, condVar = TRUE)$cond
  rj <- list()
  for (g in names(re)) {
    d <- re[[g]]; cv <- attr(d, "condVar")
    terms <- lapply(d, I); names(terms) <- names(d)
    cs <- if (!is.null(cv)) { l <- lapply(seq_along(d), function(j) I(sqrt(cv[j, j, ]))); names(l) <- names(d); l } else NULL
    rj[[g]] <- list(levels = I(rownames(d)), terms = terms, condsd = cs)
  }
  res <- list(objective_kind = "-2*logLik (Laplace, TMB)", objective = -2 * c(ll),
              minus2logLik = -2 * c(ll), logLik = c(ll), logLik_df = attr(ll, "df"),
              AIC = AIC(fit), BIC = BIC(fit), fixef = named_list(fe), se = named_list(sqrt(diag(V))),
              vcov = mat_json(V), tmb_par = named_list(par), sigma = sigma(fit), varcorr = vcj,
              nobs = nobs(fit), ngrps = NULL,
              conv_code = fit$fit$convergence, conv_message = fit$fit$message,
              pdHess = fit$sdr$pdHess, ranef = rj)
  res$ngrps <- as.list(vapply(re, nrow, 0L))
  ## independent check at the TMB estimates
  y <- cbpp$incidence
  eta0 <- as.vector(model.matrix(~ period, cbpp) %*% fe) + log(cbpp$size)
  res$independent_at_estimates <- marginal_m2ll("poisson_log", y, rep(NA, length(y)), eta0,
                                                cbpp$herd, sd = sqrt(vc$herd[1, 1]), nq = 50)
  res$saturated_minus2logLik <- saturated_m2ll("poisson", y, NULL)
  res$sum_lgamma_y_plus_1 <- sum(lgamma(y + 1))
  res <- c(res, time_fit(function() eval(expr, envir = env)))
  res$warnings <- I(cap$warnings); res$messages <- I(cap$messages)
  list(entry = list(id = id, dataset = dataset, call = call_str, package = "glmmTMB",
                    family = family, link = link, REML = FALSE, nAGQ = NULL, results = res,
                    notes = list(logLik_constants = "glmmTMB logLik is the full Laplace log-likelihood including -log(y!) (compare laplace_exact_independent)")),
       fit = fit)
}
add(tmb_entry("tmb_cbpp_pois", "cbpp",
  "glmmTMB(incidence ~ period + offset(log(size)) + (1 | herd), data = cbpp, family = poisson)",
  "poisson", "log"))

## REML lmer: ddf (Satterthwaite / Kenward-Roger) like the shared reference
for (k in seq_along(E)) {
  e <- E[[k]]
  if (e$package == "lme4" && identical(e$REML, TRUE)) {
    cat("ddf", e$id, "\n")
    E[[k]]$ddf <- ddf_block(e$call, DATA, anova_too = (e$id == "oats_splitplot_REML"))
  }
}

write_json_full(E, file.path(OUT, "lme4_extra_results.json"))

## ---------------------------------------------------------------------------
## devfun points (lmer, profiled: beta and sigma profiled out)
## ---------------------------------------------------------------------------
devfun_block <- function(id, call_str, pts) {
  fit <- FITS[[id]]
  reml <- isREML(fit)
  env <- list2env(DATA, parent = globalenv())
  dcall <- sub("\\)$", ", devFunOnly = TRUE)", call_str)
  df <- eval(parse(text = dcall)[[1]], envir = env)
  th <- getME(fit, "theta")
  n <- nobs(fit); p <- length(fixef(fit))
  pts <- c(list(optimum_from_fit = unname(th)), pts)
  points <- lapply(names(pts), function(lbl) {
    v <- df(pts[[lbl]])
    e <- environment(df)
    pwrss <- e$resp$wrss() + e$pp$sqrL(1)
    list(label = lbl, params = I(pts[[lbl]]), value = v,
         beta_hat = named_list(setNames(e$pp$beta(1), names(fixef(fit)))),
         pwrss = pwrss, ldL2 = e$pp$ldL2(), ldRX2 = e$pp$ldRX2(),
         sigma_ML = sqrt(pwrss / n), sigma_REML = sqrt(pwrss / (n - p)))
  })
  list(model_id = id, devfun_call = dcall,
       param_order = I(paste0("theta:", names(th))),
       returns = if (reml) "REML criterion (REMLcrit) at theta; beta and sigma profiled out"
                 else "ML deviance (-2 logLik) at theta; beta and sigma profiled out",
       fit_objective = unname(if (reml) fit@devcomp$cmp["REML"] else fit@devcomp$cmp["dev"]),
       n = n, p = p, points = points)
}
calls <- setNames(lapply(E, `[[`, "call"), vapply(E, `[[`, "", "id"))
DP <- list()
for (id in c("pastes_nested_ML", "pastes_nested_REML", "penicillin_crossed_ML", "penicillin_crossed_REML"))
  DP[[id]] <- devfun_block(id, calls[[id]],
                           list(T1_theta_1_1 = c(1, 1), T2_theta_0.5_2 = c(0.5, 2), T3_theta_0_0 = c(0, 0)))
write_json_full(DP, file.path(OUT, "lme4_extra_devfun_points.json"))

## ---------------------------------------------------------------------------
## versions
## ---------------------------------------------------------------------------
pv <- function(p) as.character(packageVersion(p))
write_json_full(list(R = R.version.string, lme4 = pv("lme4"), glmmTMB = pv("glmmTMB"), nlme = pv("nlme"),
                     Matrix = pv("Matrix"), TMB = pv("TMB"), lmerTest = pv("lmerTest"),
                     pbkrtest = pv("pbkrtest"), mlmRev = pv("mlmRev"), jsonlite = pv("jsonlite"),
                     platform = R.version$platform, nproc = parallel::detectCores(),
                     blas = extSoftVersion()[["BLAS"]], lapack = La_library(),
                     timing_note = "elapsed_* are wall-clock seconds per fit on this machine (median of 5 timed runs, each repeating the fit fits_per_timed_run times)"),
                file.path(OUT, "versions.json"))
cat("done\n")
