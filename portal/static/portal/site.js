// Site-wide behaviour, kept out of the templates so that the Content-Security-Policy can refuse
// every inline script and handler. A form control marked data-autosubmit submits its form when
// its value changes (the status filters, the dashboard's window choice).
document.addEventListener("change", function (event) {
  var control = event.target;
  if (control && control.form && control.hasAttribute("data-autosubmit")) {
    control.form.requestSubmit ? control.form.requestSubmit() : control.form.submit();
  }
});

// A form marked data-confirm="<question>" asks before it is sent (revoking a key cannot be
// undone).
document.addEventListener("submit", function (event) {
  var form = event.target;
  if (form && form.hasAttribute("data-confirm") && !window.confirm(form.getAttribute("data-confirm"))) {
    event.preventDefault();
  }
});
